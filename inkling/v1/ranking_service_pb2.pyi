from inkling.v1 import resources_pb2 as _resources_pb2
from inkling.v1 import validate_pb2 as _validate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CallerCandidate(_message.Message):
    __slots__ = ("item_id",)
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    def __init__(self, item_id: _Optional[str] = ...) -> None: ...

class RankCandidatesRequest(_message.Message):
    __slots__ = ("user_id", "session_id", "context", "candidates", "num_results", "debug")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    NUM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    context: _resources_pb2.RequestContext
    candidates: _containers.RepeatedCompositeFieldContainer[CallerCandidate]
    num_results: int
    debug: bool
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., context: _Optional[_Union[_resources_pb2.RequestContext, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[CallerCandidate, _Mapping]]] = ..., num_results: _Optional[int] = ..., debug: _Optional[bool] = ...) -> None: ...

class RankCandidatesResponse(_message.Message):
    __slots__ = ("items", "served_by", "degradation", "debug", "request_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    DEGRADATION_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_resources_pb2.RankedItem]
    served_by: _resources_pb2.ServedBy
    degradation: _resources_pb2.Degradation
    debug: _resources_pb2.DebugInfo
    request_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[_resources_pb2.RankedItem, _Mapping]]] = ..., served_by: _Optional[_Union[_resources_pb2.ServedBy, _Mapping]] = ..., degradation: _Optional[_Union[_resources_pb2.Degradation, _Mapping]] = ..., debug: _Optional[_Union[_resources_pb2.DebugInfo, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "session_id", "context", "num_results", "exclude_item_ids", "include_categories", "exclude_categories", "debug")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    context: _resources_pb2.RequestContext
    num_results: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_categories: _containers.RepeatedScalarFieldContainer[str]
    exclude_categories: _containers.RepeatedScalarFieldContainer[str]
    debug: bool
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., context: _Optional[_Union[_resources_pb2.RequestContext, _Mapping]] = ..., num_results: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., include_categories: _Optional[_Iterable[str]] = ..., exclude_categories: _Optional[_Iterable[str]] = ..., debug: _Optional[bool] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "served_by", "degradation", "filtered", "debug", "request_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    DEGRADATION_FIELD_NUMBER: _ClassVar[int]
    FILTERED_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_resources_pb2.RankedItem]
    served_by: _resources_pb2.ServedBy
    degradation: _resources_pb2.Degradation
    filtered: _containers.RepeatedCompositeFieldContainer[_resources_pb2.FilterCount]
    debug: _resources_pb2.DebugInfo
    request_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[_resources_pb2.RankedItem, _Mapping]]] = ..., served_by: _Optional[_Union[_resources_pb2.ServedBy, _Mapping]] = ..., degradation: _Optional[_Union[_resources_pb2.Degradation, _Mapping]] = ..., filtered: _Optional[_Iterable[_Union[_resources_pb2.FilterCount, _Mapping]]] = ..., debug: _Optional[_Union[_resources_pb2.DebugInfo, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...
