from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ColumnSummary(_message.Message):
    __slots__ = ("name", "kind", "role", "source", "count", "missing", "infinite", "mean", "m2", "min", "max", "kll", "frequent_items", "distinct")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ColumnSummary.Kind]
        NUMERIC: _ClassVar[ColumnSummary.Kind]
        CATEGORICAL: _ClassVar[ColumnSummary.Kind]
    KIND_UNSPECIFIED: ColumnSummary.Kind
    NUMERIC: ColumnSummary.Kind
    CATEGORICAL: ColumnSummary.Kind
    class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ROLE_UNSPECIFIED: _ClassVar[ColumnSummary.Role]
        FEATURE: _ClassVar[ColumnSummary.Role]
        PREDICTION: _ClassVar[ColumnSummary.Role]
    ROLE_UNSPECIFIED: ColumnSummary.Role
    FEATURE: ColumnSummary.Role
    PREDICTION: ColumnSummary.Role
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    INFINITE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    M2_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    KLL_FIELD_NUMBER: _ClassVar[int]
    FREQUENT_ITEMS_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ColumnSummary.Kind
    role: ColumnSummary.Role
    source: str
    count: int
    missing: int
    infinite: int
    mean: float
    m2: float
    min: float
    max: float
    kll: bytes
    frequent_items: bytes
    distinct: bytes
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ColumnSummary.Kind, str]] = ..., role: _Optional[_Union[ColumnSummary.Role, str]] = ..., source: _Optional[str] = ..., count: _Optional[int] = ..., missing: _Optional[int] = ..., infinite: _Optional[int] = ..., mean: _Optional[float] = ..., m2: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., kll: _Optional[bytes] = ..., frequent_items: _Optional[bytes] = ..., distinct: _Optional[bytes] = ...) -> None: ...

class WindowSummary(_message.Message):
    __slots__ = ("agent_id", "run_id", "seq", "model_name", "model_version", "model_sha256", "start_unix_nano", "end_unix_nano", "rows", "calls", "dropped_rows", "errors", "latency", "columns")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ROWS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    run_id: str
    seq: int
    model_name: str
    model_version: str
    model_sha256: str
    start_unix_nano: int
    end_unix_nano: int
    rows: int
    calls: int
    dropped_rows: int
    errors: int
    latency: ColumnSummary
    columns: _containers.RepeatedCompositeFieldContainer[ColumnSummary]
    def __init__(self, agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., seq: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ..., start_unix_nano: _Optional[int] = ..., end_unix_nano: _Optional[int] = ..., rows: _Optional[int] = ..., calls: _Optional[int] = ..., dropped_rows: _Optional[int] = ..., errors: _Optional[int] = ..., latency: _Optional[_Union[ColumnSummary, _Mapping]] = ..., columns: _Optional[_Iterable[_Union[ColumnSummary, _Mapping]]] = ...) -> None: ...
