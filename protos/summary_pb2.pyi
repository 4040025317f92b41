from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ColumnSummary(_message.Message):
    __slots__ = ("name", "kind", "role", "source", "count", "missing", "infinite", "mean", "m2", "min", "max", "kll", "frequent_items", "distinct", "exact_values", "exact_counts", "exact_overflow")
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
    EXACT_VALUES_FIELD_NUMBER: _ClassVar[int]
    EXACT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    EXACT_OVERFLOW_FIELD_NUMBER: _ClassVar[int]
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
    exact_values: _containers.RepeatedScalarFieldContainer[float]
    exact_counts: _containers.RepeatedScalarFieldContainer[int]
    exact_overflow: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ColumnSummary.Kind, str]] = ..., role: _Optional[_Union[ColumnSummary.Role, str]] = ..., source: _Optional[str] = ..., count: _Optional[int] = ..., missing: _Optional[int] = ..., infinite: _Optional[int] = ..., mean: _Optional[float] = ..., m2: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., kll: _Optional[bytes] = ..., frequent_items: _Optional[bytes] = ..., distinct: _Optional[bytes] = ..., exact_values: _Optional[_Iterable[float]] = ..., exact_counts: _Optional[_Iterable[int]] = ..., exact_overflow: bool = ...) -> None: ...

class WindowSummary(_message.Message):
    __slots__ = ("agent_id", "run_id", "seq", "model_name", "model_version", "model_sha256", "start_unix_nano", "end_unix_nano", "rows", "calls", "dropped_rows", "errors", "latency", "columns", "performance", "shadow", "sample", "crc32")
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
    PERFORMANCE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
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
    performance: Performance
    shadow: ShadowSummary
    sample: RowSample
    crc32: int
    def __init__(self, agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., seq: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ..., start_unix_nano: _Optional[int] = ..., end_unix_nano: _Optional[int] = ..., rows: _Optional[int] = ..., calls: _Optional[int] = ..., dropped_rows: _Optional[int] = ..., errors: _Optional[int] = ..., latency: _Optional[_Union[ColumnSummary, _Mapping]] = ..., columns: _Optional[_Iterable[_Union[ColumnSummary, _Mapping]]] = ..., performance: _Optional[_Union[Performance, _Mapping]] = ..., shadow: _Optional[_Union[ShadowSummary, _Mapping]] = ..., sample: _Optional[_Union[RowSample, _Mapping]] = ..., crc32: _Optional[int] = ...) -> None: ...

class ShadowSummary(_message.Message):
    __slots__ = ("model_version", "model_sha256", "calls", "rows", "skipped", "errors", "label_rows", "label_agree", "score_diff", "latency")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LABEL_ROWS_FIELD_NUMBER: _ClassVar[int]
    LABEL_AGREE_FIELD_NUMBER: _ClassVar[int]
    SCORE_DIFF_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    model_sha256: str
    calls: int
    rows: int
    skipped: int
    errors: int
    label_rows: int
    label_agree: int
    score_diff: ColumnSummary
    latency: ColumnSummary
    def __init__(self, model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ..., calls: _Optional[int] = ..., rows: _Optional[int] = ..., skipped: _Optional[int] = ..., errors: _Optional[int] = ..., label_rows: _Optional[int] = ..., label_agree: _Optional[int] = ..., score_diff: _Optional[_Union[ColumnSummary, _Mapping]] = ..., latency: _Optional[_Union[ColumnSummary, _Mapping]] = ...) -> None: ...

class RowSample(_message.Message):
    __slots__ = ("seen", "columns")
    class Column(_message.Message):
        __slots__ = ("name", "numbers", "strings")
        NAME_FIELD_NUMBER: _ClassVar[int]
        NUMBERS_FIELD_NUMBER: _ClassVar[int]
        STRINGS_FIELD_NUMBER: _ClassVar[int]
        name: str
        numbers: _containers.RepeatedScalarFieldContainer[float]
        strings: _containers.RepeatedScalarFieldContainer[str]
        def __init__(self, name: _Optional[str] = ..., numbers: _Optional[_Iterable[float]] = ..., strings: _Optional[_Iterable[str]] = ...) -> None: ...
    SEEN_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    seen: int
    columns: _containers.RepeatedCompositeFieldContainer[RowSample.Column]
    def __init__(self, seen: _Optional[int] = ..., columns: _Optional[_Iterable[_Union[RowSample.Column, _Mapping]]] = ...) -> None: ...

class Performance(_message.Message):
    __slots__ = ("labeled", "unmatched", "classes", "confusion", "error_sum", "abs_error_sum", "sq_error_sum")
    LABELED_FIELD_NUMBER: _ClassVar[int]
    UNMATCHED_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_SUM_FIELD_NUMBER: _ClassVar[int]
    ABS_ERROR_SUM_FIELD_NUMBER: _ClassVar[int]
    SQ_ERROR_SUM_FIELD_NUMBER: _ClassVar[int]
    labeled: int
    unmatched: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    confusion: _containers.RepeatedScalarFieldContainer[int]
    error_sum: float
    abs_error_sum: float
    sq_error_sum: float
    def __init__(self, labeled: _Optional[int] = ..., unmatched: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., confusion: _Optional[_Iterable[int]] = ..., error_sum: _Optional[float] = ..., abs_error_sum: _Optional[float] = ..., sq_error_sum: _Optional[float] = ...) -> None: ...

class ReferenceProfile(_message.Message):
    __slots__ = ("model_name", "model_sha256", "data_sha256", "rows", "data_name", "created_unix_nano", "columns", "performance", "feature_names", "projection", "calibration")
    class FeatureNamesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ColumnNames
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ColumnNames, _Mapping]] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_SHA256_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DATA_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    PERFORMANCE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_sha256: str
    data_sha256: str
    rows: int
    data_name: str
    created_unix_nano: int
    columns: _containers.RepeatedCompositeFieldContainer[ColumnSummary]
    performance: Performance
    feature_names: _containers.MessageMap[str, ColumnNames]
    projection: Projection
    calibration: Calibration
    def __init__(self, model_name: _Optional[str] = ..., model_sha256: _Optional[str] = ..., data_sha256: _Optional[str] = ..., rows: _Optional[int] = ..., data_name: _Optional[str] = ..., created_unix_nano: _Optional[int] = ..., columns: _Optional[_Iterable[_Union[ColumnSummary, _Mapping]]] = ..., performance: _Optional[_Union[Performance, _Mapping]] = ..., feature_names: _Optional[_Mapping[str, ColumnNames]] = ..., projection: _Optional[_Union[Projection, _Mapping]] = ..., calibration: _Optional[_Union[Calibration, _Mapping]] = ...) -> None: ...

class ColumnNames(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class Projection(_message.Message):
    __slots__ = ("columns", "mean", "scale", "components", "basis", "explained_variance")
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedScalarFieldContainer[str]
    mean: _containers.RepeatedScalarFieldContainer[float]
    scale: _containers.RepeatedScalarFieldContainer[float]
    components: int
    basis: _containers.RepeatedScalarFieldContainer[float]
    explained_variance: float
    def __init__(self, columns: _Optional[_Iterable[str]] = ..., mean: _Optional[_Iterable[float]] = ..., scale: _Optional[_Iterable[float]] = ..., components: _Optional[int] = ..., basis: _Optional[_Iterable[float]] = ..., explained_variance: _Optional[float] = ...) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("confidence", "correct", "reference_accuracy", "reference_estimated_accuracy")
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ESTIMATED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    confidence: _containers.RepeatedScalarFieldContainer[float]
    correct: _containers.RepeatedScalarFieldContainer[float]
    reference_accuracy: float
    reference_estimated_accuracy: float
    def __init__(self, confidence: _Optional[_Iterable[float]] = ..., correct: _Optional[_Iterable[float]] = ..., reference_accuracy: _Optional[float] = ..., reference_estimated_accuracy: _Optional[float] = ...) -> None: ...
