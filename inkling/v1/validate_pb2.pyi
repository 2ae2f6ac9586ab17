from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor
RULES_FIELD_NUMBER: _ClassVar[int]
rules: _descriptor.FieldDescriptor

class FieldRules(_message.Message):
    __slots__ = ("required", "max_len", "min", "max", "max_items", "unique", "unique_by", "non_blank")
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_BY_FIELD_NUMBER: _ClassVar[int]
    NON_BLANK_FIELD_NUMBER: _ClassVar[int]
    required: bool
    max_len: int
    min: int
    max: int
    max_items: int
    unique: bool
    unique_by: str
    non_blank: bool
    def __init__(self, required: _Optional[bool] = ..., max_len: _Optional[int] = ..., min: _Optional[int] = ..., max: _Optional[int] = ..., max_items: _Optional[int] = ..., unique: _Optional[bool] = ..., unique_by: _Optional[str] = ..., non_blank: _Optional[bool] = ...) -> None: ...
