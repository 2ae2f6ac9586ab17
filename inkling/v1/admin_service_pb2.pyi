from inkling.v1 import validate_pb2 as _validate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ForgetUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ForgetUserResponse(_message.Message):
    __slots__ = ("first_time", "sessions", "removed", "files_rewritten", "models_flagged", "incomplete")
    class RemovedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    FIRST_TIME_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    FILES_REWRITTEN_FIELD_NUMBER: _ClassVar[int]
    MODELS_FLAGGED_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_FIELD_NUMBER: _ClassVar[int]
    first_time: bool
    sessions: int
    removed: _containers.ScalarMap[str, int]
    files_rewritten: int
    models_flagged: _containers.RepeatedScalarFieldContainer[str]
    incomplete: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, first_time: _Optional[bool] = ..., sessions: _Optional[int] = ..., removed: _Optional[_Mapping[str, int]] = ..., files_rewritten: _Optional[int] = ..., models_flagged: _Optional[_Iterable[str]] = ..., incomplete: _Optional[_Iterable[str]] = ...) -> None: ...
