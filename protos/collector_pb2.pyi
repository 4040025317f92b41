from protos import summary_pb2 as _summary_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorInfo(_message.Message):
    __slots__ = ("name", "type", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_id", "run_id", "host", "model_name", "model_version", "model_sha256", "inputs", "outputs", "agent_version", "onnxruntime_version", "started_unix_nano", "spool")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    SPOOL_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    run_id: str
    host: str
    model_name: str
    model_version: str
    model_sha256: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    agent_version: str
    onnxruntime_version: str
    started_unix_nano: int
    spool: SpoolStatus
    def __init__(self, agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., host: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., agent_version: _Optional[str] = ..., onnxruntime_version: _Optional[str] = ..., started_unix_nano: _Optional[int] = ..., spool: _Optional[_Union[SpoolStatus, _Mapping]] = ...) -> None: ...

class SpoolStatus(_message.Message):
    __slots__ = ("windows", "bytes", "dropped_windows", "dropped_rows", "rejected_windows")
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ROWS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    windows: int
    bytes: int
    dropped_windows: int
    dropped_rows: int
    rejected_windows: int
    def __init__(self, windows: _Optional[int] = ..., bytes: _Optional[int] = ..., dropped_windows: _Optional[int] = ..., dropped_rows: _Optional[int] = ..., rejected_windows: _Optional[int] = ...) -> None: ...

class WindowBatch(_message.Message):
    __slots__ = ("windows",)
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    windows: _containers.RepeatedCompositeFieldContainer[_summary_pb2.WindowSummary]
    def __init__(self, windows: _Optional[_Iterable[_Union[_summary_pb2.WindowSummary, _Mapping]]] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "windows", "status")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    windows: WindowBatch
    status: SpoolStatus
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., windows: _Optional[_Union[WindowBatch, _Mapping]] = ..., status: _Optional[_Union[SpoolStatus, _Mapping]] = ...) -> None: ...

class WindowAck(_message.Message):
    __slots__ = ("run_id", "seq", "result", "reason")
    class Result(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RESULT_UNSPECIFIED: _ClassVar[WindowAck.Result]
        STORED: _ClassVar[WindowAck.Result]
        DUPLICATE: _ClassVar[WindowAck.Result]
        REJECTED: _ClassVar[WindowAck.Result]
    RESULT_UNSPECIFIED: WindowAck.Result
    STORED: WindowAck.Result
    DUPLICATE: WindowAck.Result
    REJECTED: WindowAck.Result
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    seq: int
    result: WindowAck.Result
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., seq: _Optional[int] = ..., result: _Optional[_Union[WindowAck.Result, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class Acks(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[WindowAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[WindowAck, _Mapping]]] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("id", "kind", "args")
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    args: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., args: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CollectorMessage(_message.Message):
    __slots__ = ("acks", "command")
    ACKS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    acks: Acks
    command: Command
    def __init__(self, acks: _Optional[_Union[Acks, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentState(_message.Message):
    __slots__ = ("agent_id", "run_id", "host", "model_name", "model_version", "connected", "connected_unix_nano", "last_seen_unix_nano", "last_window_end_unix_nano", "windows", "rows", "dropped_rows", "spool", "restarts")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LAST_WINDOW_END_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ROWS_FIELD_NUMBER: _ClassVar[int]
    SPOOL_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    run_id: str
    host: str
    model_name: str
    model_version: str
    connected: bool
    connected_unix_nano: int
    last_seen_unix_nano: int
    last_window_end_unix_nano: int
    windows: int
    rows: int
    dropped_rows: int
    spool: SpoolStatus
    restarts: int
    def __init__(self, agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., host: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., connected: bool = ..., connected_unix_nano: _Optional[int] = ..., last_seen_unix_nano: _Optional[int] = ..., last_window_end_unix_nano: _Optional[int] = ..., windows: _Optional[int] = ..., rows: _Optional[int] = ..., dropped_rows: _Optional[int] = ..., spool: _Optional[_Union[SpoolStatus, _Mapping]] = ..., restarts: _Optional[int] = ...) -> None: ...

class ModelVersionTotals(_message.Message):
    __slots__ = ("model_name", "model_version", "windows", "rows", "dropped_rows", "errors", "last_window_end_unix_nano")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ROWS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LAST_WINDOW_END_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    windows: int
    rows: int
    dropped_rows: int
    errors: int
    last_window_end_unix_nano: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., windows: _Optional[int] = ..., rows: _Optional[int] = ..., dropped_rows: _Optional[int] = ..., errors: _Optional[int] = ..., last_window_end_unix_nano: _Optional[int] = ...) -> None: ...

class CollectorCounters(_message.Message):
    __slots__ = ("windows_stored", "windows_duplicate", "windows_rejected", "auth_failures", "write_queue_depth")
    WINDOWS_STORED_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    AUTH_FAILURES_FIELD_NUMBER: _ClassVar[int]
    WRITE_QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    windows_stored: int
    windows_duplicate: int
    windows_rejected: int
    auth_failures: int
    write_queue_depth: int
    def __init__(self, windows_stored: _Optional[int] = ..., windows_duplicate: _Optional[int] = ..., windows_rejected: _Optional[int] = ..., auth_failures: _Optional[int] = ..., write_queue_depth: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("agents", "models", "counters", "collector_version")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    COLLECTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentState]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersionTotals]
    counters: CollectorCounters
    collector_version: str
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentState, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[ModelVersionTotals, _Mapping]]] = ..., counters: _Optional[_Union[CollectorCounters, _Mapping]] = ..., collector_version: _Optional[str] = ...) -> None: ...

class ListWindowsRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "since_unix_nano", "limit", "include_summaries")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    since_unix_nano: int
    limit: int
    include_summaries: bool
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., since_unix_nano: _Optional[int] = ..., limit: _Optional[int] = ..., include_summaries: bool = ...) -> None: ...

class WindowInfo(_message.Message):
    __slots__ = ("agent_id", "run_id", "seq", "model_name", "model_version", "start_unix_nano", "end_unix_nano", "rows", "calls", "dropped_rows", "errors", "level", "summary")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ROWS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    run_id: str
    seq: int
    model_name: str
    model_version: str
    start_unix_nano: int
    end_unix_nano: int
    rows: int
    calls: int
    dropped_rows: int
    errors: int
    level: str
    summary: _summary_pb2.WindowSummary
    def __init__(self, agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., seq: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., start_unix_nano: _Optional[int] = ..., end_unix_nano: _Optional[int] = ..., rows: _Optional[int] = ..., calls: _Optional[int] = ..., dropped_rows: _Optional[int] = ..., errors: _Optional[int] = ..., level: _Optional[str] = ..., summary: _Optional[_Union[_summary_pb2.WindowSummary, _Mapping]] = ...) -> None: ...

class ListWindowsResponse(_message.Message):
    __slots__ = ("windows",)
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    windows: _containers.RepeatedCompositeFieldContainer[WindowInfo]
    def __init__(self, windows: _Optional[_Iterable[_Union[WindowInfo, _Mapping]]] = ...) -> None: ...
