from inkling.v1 import resources_pb2 as _resources_pb2
from inkling.v1 import validate_pb2 as _validate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrieveCandidatesRequest(_message.Message):
    __slots__ = ("user_id", "session_id", "context", "num_candidates", "exclude_item_ids", "include_categories", "exclude_categories", "debug", "packed")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    context: _resources_pb2.RequestContext
    num_candidates: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_categories: _containers.RepeatedScalarFieldContainer[str]
    debug: bool
    packed: bool
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., context: _Optional[_Union[_resources_pb2.RequestContext, _Mapping]] = ..., num_candidates: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., include_categories: _Optional[_Iterable[str]] = ..., exclude_categories: _Optional[_Iterable[str]] = ..., debug: _Optional[bool] = ..., packed: _Optional[bool] = ...) -> None: ...

class RetrieveCandidatesResponse(_message.Message):
    __slots__ = ("candidates", "served_by", "degradation", "filtered", "debug", "packed")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    DEGRADATION_FIELD_NUMBER: _ClassVar[int]
    FILTERED_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Candidate]
    served_by: _resources_pb2.ServedBy
    degradation: _resources_pb2.Degradation
    filtered: _containers.RepeatedCompositeFieldContainer[_resources_pb2.FilterCount]
    debug: _resources_pb2.DebugInfo
    packed: PackedCandidates
    def __init__(self, candidates: _Optional[_Iterable[_Union[_resources_pb2.Candidate, _Mapping]]] = ..., served_by: _Optional[_Union[_resources_pb2.ServedBy, _Mapping]] = ..., degradation: _Optional[_Union[_resources_pb2.Degradation, _Mapping]] = ..., filtered: _Optional[_Iterable[_Union[_resources_pb2.FilterCount, _Mapping]]] = ..., debug: _Optional[_Union[_resources_pb2.DebugInfo, _Mapping]] = ..., packed: _Optional[_Union[PackedCandidates, _Mapping]] = ...) -> None: ...

class PackedCandidates(_message.Message):
    __slots__ = ("item_ids", "scores", "sources", "also_positions", "also_sources")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    ALSO_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ALSO_SOURCES_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    sources: _containers.RepeatedScalarFieldContainer[_resources_pb2.CandidateSource]
    also_positions: _containers.RepeatedScalarFieldContainer[int]
    also_sources: _containers.RepeatedScalarFieldContainer[_resources_pb2.CandidateSource]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., sources: _Optional[_Iterable[_Union[_resources_pb2.CandidateSource, str]]] = ..., also_positions: _Optional[_Iterable[int]] = ..., also_sources: _Optional[_Iterable[_Union[_resources_pb2.CandidateSource, str]]] = ...) -> None: ...
