import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from inkling.v1 import validate_pb2 as _validate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_PAGE_VIEW: _ClassVar[EventType]
    EVENT_TYPE_ITEM_VIEW: _ClassVar[EventType]
    EVENT_TYPE_CLICK: _ClassVar[EventType]
    EVENT_TYPE_ADD_TO_CART: _ClassVar[EventType]
    EVENT_TYPE_PURCHASE: _ClassVar[EventType]

class CandidateSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANDIDATE_SOURCE_UNSPECIFIED: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_ANN: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_COVISITATION: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_POPULARITY: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_CALLER: _ClassVar[CandidateSource]

class DegradedReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEGRADED_REASON_UNSPECIFIED: _ClassVar[DegradedReason]
    DEGRADED_REASON_RETRIEVAL_UNAVAILABLE: _ClassVar[DegradedReason]
    DEGRADED_REASON_RETRIEVAL_DEADLINE: _ClassVar[DegradedReason]
    DEGRADED_REASON_FEATURES_UNAVAILABLE: _ClassVar[DegradedReason]
    DEGRADED_REASON_SCORER_FAILED: _ClassVar[DegradedReason]
    DEGRADED_REASON_SCORER_DEADLINE: _ClassVar[DegradedReason]
    DEGRADED_REASON_SOURCE_FAILED: _ClassVar[DegradedReason]
    DEGRADED_REASON_FEATURES_MISSING: _ClassVar[DegradedReason]
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_PAGE_VIEW: EventType
EVENT_TYPE_ITEM_VIEW: EventType
EVENT_TYPE_CLICK: EventType
EVENT_TYPE_ADD_TO_CART: EventType
EVENT_TYPE_PURCHASE: EventType
CANDIDATE_SOURCE_UNSPECIFIED: CandidateSource
CANDIDATE_SOURCE_ANN: CandidateSource
CANDIDATE_SOURCE_COVISITATION: CandidateSource
CANDIDATE_SOURCE_POPULARITY: CandidateSource
CANDIDATE_SOURCE_CALLER: CandidateSource
DEGRADED_REASON_UNSPECIFIED: DegradedReason
DEGRADED_REASON_RETRIEVAL_UNAVAILABLE: DegradedReason
DEGRADED_REASON_RETRIEVAL_DEADLINE: DegradedReason
DEGRADED_REASON_FEATURES_UNAVAILABLE: DegradedReason
DEGRADED_REASON_SCORER_FAILED: DegradedReason
DEGRADED_REASON_SCORER_DEADLINE: DegradedReason
DEGRADED_REASON_SOURCE_FAILED: DegradedReason
DEGRADED_REASON_FEATURES_MISSING: DegradedReason

class Event(_message.Message):
    __slots__ = ("event_id", "user_id", "session_id", "item_id", "event_type", "timestamp", "dwell_ms", "scroll_depth", "device", "surface", "position", "request_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    DWELL_MS_FIELD_NUMBER: _ClassVar[int]
    SCROLL_DEPTH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    session_id: str
    item_id: str
    event_type: EventType
    timestamp: _timestamp_pb2.Timestamp
    dwell_ms: int
    scroll_depth: float
    device: str
    surface: str
    position: int
    request_id: str
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., item_id: _Optional[str] = ..., event_type: _Optional[_Union[EventType, str]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., dwell_ms: _Optional[int] = ..., scroll_depth: _Optional[float] = ..., device: _Optional[str] = ..., surface: _Optional[str] = ..., position: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class RequestContext(_message.Message):
    __slots__ = ("device", "surface", "locale", "request_time")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    LOCALE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    device: str
    surface: str
    locale: str
    request_time: _timestamp_pb2.Timestamp
    def __init__(self, device: _Optional[str] = ..., surface: _Optional[str] = ..., locale: _Optional[str] = ..., request_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "score", "source", "sources")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    source: CandidateSource
    sources: _containers.RepeatedScalarFieldContainer[CandidateSource]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., source: _Optional[_Union[CandidateSource, str]] = ..., sources: _Optional[_Iterable[_Union[CandidateSource, str]]] = ...) -> None: ...

class RankedItem(_message.Message):
    __slots__ = ("item_id", "score", "rank", "source", "category")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    rank: int
    source: CandidateSource
    category: str
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., source: _Optional[_Union[CandidateSource, str]] = ..., category: _Optional[str] = ...) -> None: ...

class ServedBy(_message.Message):
    __slots__ = ("model_version", "feature_service", "index_version")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    feature_service: str
    index_version: str
    def __init__(self, model_version: _Optional[str] = ..., feature_service: _Optional[str] = ..., index_version: _Optional[str] = ...) -> None: ...

class Degradation(_message.Message):
    __slots__ = ("degraded", "reasons", "detail")
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    degraded: bool
    reasons: _containers.RepeatedScalarFieldContainer[DegradedReason]
    detail: str
    def __init__(self, degraded: _Optional[bool] = ..., reasons: _Optional[_Iterable[_Union[DegradedReason, str]]] = ..., detail: _Optional[str] = ...) -> None: ...

class FilterCount(_message.Message):
    __slots__ = ("filter", "removed")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    filter: str
    removed: int
    def __init__(self, filter: _Optional[str] = ..., removed: _Optional[int] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "micros")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MICROS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    micros: int
    def __init__(self, stage: _Optional[str] = ..., micros: _Optional[int] = ...) -> None: ...

class FeatureValue(_message.Message):
    __slots__ = ("entity", "feature", "value", "defaulted")
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DEFAULTED_FIELD_NUMBER: _ClassVar[int]
    entity: str
    feature: str
    value: str
    defaulted: bool
    def __init__(self, entity: _Optional[str] = ..., feature: _Optional[str] = ..., value: _Optional[str] = ..., defaulted: _Optional[bool] = ...) -> None: ...

class DebugInfo(_message.Message):
    __slots__ = ("timings", "features")
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    features: _containers.RepeatedCompositeFieldContainer[FeatureValue]
    def __init__(self, timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., features: _Optional[_Iterable[_Union[FeatureValue, _Mapping]]] = ...) -> None: ...

class ServeRecord(_message.Message):
    __slots__ = ("request_id", "served_at", "user_id", "session_id", "surface", "operation", "item_ids", "scores", "sources", "propensities", "model_version", "index_version", "feature_service", "experiment", "arm", "degraded", "policy", "seed", "explored", "pool")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVED_AT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PROPENSITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EXPLORED_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    served_at: _timestamp_pb2.Timestamp
    user_id: str
    session_id: str
    surface: str
    operation: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    sources: _containers.RepeatedScalarFieldContainer[CandidateSource]
    propensities: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    index_version: str
    feature_service: str
    experiment: str
    arm: str
    degraded: _containers.RepeatedScalarFieldContainer[DegradedReason]
    policy: str
    seed: int
    explored: _containers.RepeatedScalarFieldContainer[bool]
    pool: ExplorationPool
    def __init__(self, request_id: _Optional[str] = ..., served_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., surface: _Optional[str] = ..., operation: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., sources: _Optional[_Iterable[_Union[CandidateSource, str]]] = ..., propensities: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ..., index_version: _Optional[str] = ..., feature_service: _Optional[str] = ..., experiment: _Optional[str] = ..., arm: _Optional[str] = ..., degraded: _Optional[_Iterable[_Union[DegradedReason, str]]] = ..., policy: _Optional[str] = ..., seed: _Optional[int] = ..., explored: _Optional[_Iterable[bool]] = ..., pool: _Optional[_Union[ExplorationPool, _Mapping]] = ...) -> None: ...

class ExplorationPool(_message.Message):
    __slots__ = ("item_ids", "scores", "categories", "values", "feature_names", "features")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    categories: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedScalarFieldContainer[float]
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    features: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., categories: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[float]] = ..., feature_names: _Optional[_Iterable[str]] = ..., features: _Optional[_Iterable[float]] = ...) -> None: ...
