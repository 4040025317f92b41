from protos import summary_pb2 as _summary_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FetchArtifactRequest(_message.Message):
    __slots__ = ("model_name", "version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("data", "total_size", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_size: int
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("agent_id", "run_id", "host", "model_name", "model_version", "model_sha256", "inputs", "outputs", "agent_version", "onnxruntime_version", "started_unix_nano", "spool", "managed", "model_state", "spooled_models")
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
    MANAGED_FIELD_NUMBER: _ClassVar[int]
    MODEL_STATE_FIELD_NUMBER: _ClassVar[int]
    SPOOLED_MODELS_FIELD_NUMBER: _ClassVar[int]
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
    managed: bool
    model_state: ModelState
    spooled_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., host: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., agent_version: _Optional[str] = ..., onnxruntime_version: _Optional[str] = ..., started_unix_nano: _Optional[int] = ..., spool: _Optional[_Union[SpoolStatus, _Mapping]] = ..., managed: bool = ..., model_state: _Optional[_Union[ModelState, _Mapping]] = ..., spooled_models: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelState(_message.Message):
    __slots__ = ("command_id", "model_version", "model_sha256", "ok", "error", "shadow_version", "shadow_share")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SHARE_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    model_version: str
    model_sha256: str
    ok: bool
    error: str
    shadow_version: str
    shadow_share: float
    def __init__(self, command_id: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ..., ok: bool = ..., error: _Optional[str] = ..., shadow_version: _Optional[str] = ..., shadow_share: _Optional[float] = ...) -> None: ...

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
    __slots__ = ("hello", "windows", "status", "model_state")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_STATE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    windows: WindowBatch
    status: SpoolStatus
    model_state: ModelState
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., windows: _Optional[_Union[WindowBatch, _Mapping]] = ..., status: _Optional[_Union[SpoolStatus, _Mapping]] = ..., model_state: _Optional[_Union[ModelState, _Mapping]] = ...) -> None: ...

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

class RollbackRequest(_message.Message):
    __slots__ = ("model_name", "to_version", "reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    to_version: int
    reason: str
    def __init__(self, model_name: _Optional[str] = ..., to_version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("id", "model_name", "version", "kind", "actor", "reason", "started_unix_nano", "from_version", "agents", "share")
    class AgentAck(_message.Message):
        __slots__ = ("agent_id", "run_id", "state", "error", "unix_nano")
        AGENT_ID_FIELD_NUMBER: _ClassVar[int]
        RUN_ID_FIELD_NUMBER: _ClassVar[int]
        STATE_FIELD_NUMBER: _ClassVar[int]
        ERROR_FIELD_NUMBER: _ClassVar[int]
        UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
        agent_id: str
        run_id: str
        state: str
        error: str
        unix_nano: int
        def __init__(self, agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., unix_nano: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    id: int
    model_name: str
    version: int
    kind: str
    actor: str
    reason: str
    started_unix_nano: int
    from_version: int
    agents: _containers.RepeatedCompositeFieldContainer[Rollout.AgentAck]
    share: float
    def __init__(self, id: _Optional[int] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[str] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., started_unix_nano: _Optional[int] = ..., from_version: _Optional[int] = ..., agents: _Optional[_Iterable[_Union[Rollout.AgentAck, _Mapping]]] = ..., share: _Optional[float] = ...) -> None: ...

class ListRolloutsRequest(_message.Message):
    __slots__ = ("model_name", "limit", "page_token")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    limit: int
    page_token: str
    def __init__(self, model_name: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRolloutsResponse(_message.Message):
    __slots__ = ("rollouts", "next_page_token")
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    next_page_token: str
    def __init__(self, rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ShowRolloutRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class SetShadowRequest(_message.Message):
    __slots__ = ("model_name", "version", "share", "reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    share: float
    reason: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., share: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class ShadowReportRequest(_message.Message):
    __slots__ = ("model_name", "version", "since_unix_nano")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    since_unix_nano: int
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., since_unix_nano: _Optional[int] = ...) -> None: ...

class ShadowReportResponse(_message.Message):
    __slots__ = ("model_name", "production_version", "shadow_version", "summary", "production_latency")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PRODUCTION_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PRODUCTION_LATENCY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    production_version: str
    shadow_version: str
    summary: _summary_pb2.ShadowSummary
    production_latency: _summary_pb2.ColumnSummary
    def __init__(self, model_name: _Optional[str] = ..., production_version: _Optional[str] = ..., shadow_version: _Optional[str] = ..., summary: _Optional[_Union[_summary_pb2.ShadowSummary, _Mapping]] = ..., production_latency: _Optional[_Union[_summary_pb2.ColumnSummary, _Mapping]] = ...) -> None: ...

class ExportDataRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "since_unix_nano", "until_unix_nano")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    since_unix_nano: int
    until_unix_nano: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., since_unix_nano: _Optional[int] = ..., until_unix_nano: _Optional[int] = ...) -> None: ...

class ExportDataChunk(_message.Message):
    __slots__ = ("sample", "model_version", "agent_id", "window_end_unix_nano")
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    sample: _summary_pb2.RowSample
    model_version: str
    agent_id: str
    window_end_unix_nano: int
    def __init__(self, sample: _Optional[_Union[_summary_pb2.RowSample, _Mapping]] = ..., model_version: _Optional[str] = ..., agent_id: _Optional[str] = ..., window_end_unix_nano: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentState(_message.Message):
    __slots__ = ("agent_id", "run_id", "host", "model_name", "model_version", "connected", "connected_unix_nano", "last_seen_unix_nano", "last_window_end_unix_nano", "windows", "rows", "dropped_rows", "spool", "restarts", "managed", "desired_version", "model_error", "shadow_version", "shadow_share", "collector_id")
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
    MANAGED_FIELD_NUMBER: _ClassVar[int]
    DESIRED_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ERROR_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SHARE_FIELD_NUMBER: _ClassVar[int]
    COLLECTOR_ID_FIELD_NUMBER: _ClassVar[int]
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
    managed: bool
    desired_version: str
    model_error: str
    shadow_version: str
    shadow_share: float
    collector_id: str
    def __init__(self, agent_id: _Optional[str] = ..., run_id: _Optional[str] = ..., host: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., connected: bool = ..., connected_unix_nano: _Optional[int] = ..., last_seen_unix_nano: _Optional[int] = ..., last_window_end_unix_nano: _Optional[int] = ..., windows: _Optional[int] = ..., rows: _Optional[int] = ..., dropped_rows: _Optional[int] = ..., spool: _Optional[_Union[SpoolStatus, _Mapping]] = ..., restarts: _Optional[int] = ..., managed: bool = ..., desired_version: _Optional[str] = ..., model_error: _Optional[str] = ..., shadow_version: _Optional[str] = ..., shadow_share: _Optional[float] = ..., collector_id: _Optional[str] = ...) -> None: ...

class CollectorState(_message.Message):
    __slots__ = ("collector_id", "address", "started_unix_nano", "heartbeat_unix_nano", "live", "stopped")
    COLLECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    collector_id: str
    address: str
    started_unix_nano: int
    heartbeat_unix_nano: int
    live: bool
    stopped: bool
    def __init__(self, collector_id: _Optional[str] = ..., address: _Optional[str] = ..., started_unix_nano: _Optional[int] = ..., heartbeat_unix_nano: _Optional[int] = ..., live: bool = ..., stopped: bool = ...) -> None: ...

class LeaseState(_message.Message):
    __slots__ = ("name", "holder", "expires_unix_nano", "live")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    holder: str
    expires_unix_nano: int
    live: bool
    def __init__(self, name: _Optional[str] = ..., holder: _Optional[str] = ..., expires_unix_nano: _Optional[int] = ..., live: bool = ...) -> None: ...

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
    __slots__ = ("agents", "models", "counters", "collector_version", "collector_id", "collectors", "leases")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    COLLECTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLLECTOR_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTORS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentState]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersionTotals]
    counters: CollectorCounters
    collector_version: str
    collector_id: str
    collectors: _containers.RepeatedCompositeFieldContainer[CollectorState]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseState]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentState, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[ModelVersionTotals, _Mapping]]] = ..., counters: _Optional[_Union[CollectorCounters, _Mapping]] = ..., collector_version: _Optional[str] = ..., collector_id: _Optional[str] = ..., collectors: _Optional[_Iterable[_Union[CollectorState, _Mapping]]] = ..., leases: _Optional[_Iterable[_Union[LeaseState, _Mapping]]] = ...) -> None: ...

class ListWindowsRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "since_unix_nano", "limit", "include_summaries", "page_token")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    since_unix_nano: int
    limit: int
    include_summaries: bool
    page_token: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., since_unix_nano: _Optional[int] = ..., limit: _Optional[int] = ..., include_summaries: bool = ..., page_token: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("windows", "next_page_token")
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    windows: _containers.RepeatedCompositeFieldContainer[WindowInfo]
    next_page_token: str
    def __init__(self, windows: _Optional[_Iterable[_Union[WindowInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AttachProfileRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "profile")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    profile: _summary_pb2.ReferenceProfile
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., profile: _Optional[_Union[_summary_pb2.ReferenceProfile, _Mapping]] = ...) -> None: ...

class AttachProfileResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "columns", "replaced", "warnings")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    columns: int
    replaced: bool
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., columns: _Optional[int] = ..., replaced: bool = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class DriftRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "history")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    history: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., history: _Optional[int] = ...) -> None: ...

class ColumnDrift(_message.Message):
    __slots__ = ("name", "kind", "role", "drifted", "psi", "ks_d", "ks_p", "wasserstein", "chi2", "chi2_p", "js", "p_adjusted", "missing_rate", "reference_missing_rate", "rows", "reason", "missing_p", "missing_diff", "method", "span_seconds", "missing_effect")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    KS_D_FIELD_NUMBER: _ClassVar[int]
    KS_P_FIELD_NUMBER: _ClassVar[int]
    WASSERSTEIN_FIELD_NUMBER: _ClassVar[int]
    CHI2_FIELD_NUMBER: _ClassVar[int]
    CHI2_P_FIELD_NUMBER: _ClassVar[int]
    JS_FIELD_NUMBER: _ClassVar[int]
    P_ADJUSTED_FIELD_NUMBER: _ClassVar[int]
    MISSING_RATE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MISSING_RATE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MISSING_P_FIELD_NUMBER: _ClassVar[int]
    MISSING_DIFF_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SPAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_EFFECT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: _summary_pb2.ColumnSummary.Kind
    role: _summary_pb2.ColumnSummary.Role
    drifted: bool
    psi: float
    ks_d: float
    ks_p: float
    wasserstein: float
    chi2: float
    chi2_p: float
    js: float
    p_adjusted: float
    missing_rate: float
    reference_missing_rate: float
    rows: int
    reason: str
    missing_p: float
    missing_diff: float
    method: str
    span_seconds: float
    missing_effect: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[_summary_pb2.ColumnSummary.Kind, str]] = ..., role: _Optional[_Union[_summary_pb2.ColumnSummary.Role, str]] = ..., drifted: bool = ..., psi: _Optional[float] = ..., ks_d: _Optional[float] = ..., ks_p: _Optional[float] = ..., wasserstein: _Optional[float] = ..., chi2: _Optional[float] = ..., chi2_p: _Optional[float] = ..., js: _Optional[float] = ..., p_adjusted: _Optional[float] = ..., missing_rate: _Optional[float] = ..., reference_missing_rate: _Optional[float] = ..., rows: _Optional[int] = ..., reason: _Optional[str] = ..., missing_p: _Optional[float] = ..., missing_diff: _Optional[float] = ..., method: _Optional[str] = ..., span_seconds: _Optional[float] = ..., missing_effect: _Optional[float] = ...) -> None: ...

class DriftEvaluation(_message.Message):
    __slots__ = ("id", "model_name", "model_version", "evaluated_unix_nano", "window_start_unix_nano", "window_end_unix_nano", "rows", "evaluated", "reason", "columns", "accuracy", "reference_accuracy", "mae", "reference_mae", "estimated_accuracy", "reference_estimated_accuracy", "not_compared")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MAE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MAE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ESTIMATED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    NOT_COMPARED_FIELD_NUMBER: _ClassVar[int]
    id: int
    model_name: str
    model_version: str
    evaluated_unix_nano: int
    window_start_unix_nano: int
    window_end_unix_nano: int
    rows: int
    evaluated: bool
    reason: str
    columns: _containers.RepeatedCompositeFieldContainer[ColumnDrift]
    accuracy: float
    reference_accuracy: float
    mae: float
    reference_mae: float
    estimated_accuracy: float
    reference_estimated_accuracy: float
    not_compared: int
    def __init__(self, id: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., evaluated_unix_nano: _Optional[int] = ..., window_start_unix_nano: _Optional[int] = ..., window_end_unix_nano: _Optional[int] = ..., rows: _Optional[int] = ..., evaluated: bool = ..., reason: _Optional[str] = ..., columns: _Optional[_Iterable[_Union[ColumnDrift, _Mapping]]] = ..., accuracy: _Optional[float] = ..., reference_accuracy: _Optional[float] = ..., mae: _Optional[float] = ..., reference_mae: _Optional[float] = ..., estimated_accuracy: _Optional[float] = ..., reference_estimated_accuracy: _Optional[float] = ..., not_compared: _Optional[int] = ...) -> None: ...

class DriftResponse(_message.Message):
    __slots__ = ("latest", "history")
    LATEST_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    latest: _containers.RepeatedCompositeFieldContainer[DriftEvaluation]
    history: _containers.RepeatedCompositeFieldContainer[DriftEvaluation]
    def __init__(self, latest: _Optional[_Iterable[_Union[DriftEvaluation, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[DriftEvaluation, _Mapping]]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("id", "model_name", "model_version", "column", "kind", "state", "opened_unix_nano", "resolved_unix_nano", "acknowledged_unix_nano", "acknowledged_by", "summary", "evaluation_id", "resolved_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPENED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_BY_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_REASON_FIELD_NUMBER: _ClassVar[int]
    id: int
    model_name: str
    model_version: str
    column: str
    kind: str
    state: str
    opened_unix_nano: int
    resolved_unix_nano: int
    acknowledged_unix_nano: int
    acknowledged_by: str
    summary: str
    evaluation_id: int
    resolved_reason: str
    def __init__(self, id: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., column: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., opened_unix_nano: _Optional[int] = ..., resolved_unix_nano: _Optional[int] = ..., acknowledged_unix_nano: _Optional[int] = ..., acknowledged_by: _Optional[str] = ..., summary: _Optional[str] = ..., evaluation_id: _Optional[int] = ..., resolved_reason: _Optional[str] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("model_name", "include_resolved", "limit", "page_token")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RESOLVED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    include_resolved: bool
    limit: int
    page_token: str
    def __init__(self, model_name: _Optional[str] = ..., include_resolved: bool = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts", "next_page_token")
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    next_page_token: str
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AckAlertRequest(_message.Message):
    __slots__ = ("id", "note")
    ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    id: int
    note: str
    def __init__(self, id: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class DriftConfigRequest(_message.Message):
    __slots__ = ("model_name", "config_json")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    config_json: str
    def __init__(self, model_name: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class DriftConfigResponse(_message.Message):
    __slots__ = ("model_name", "config_json", "is_default")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    config_json: str
    is_default: bool
    def __init__(self, model_name: _Optional[str] = ..., config_json: _Optional[str] = ..., is_default: bool = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "at_unix_nano", "actor", "action", "object", "before", "after", "reason", "prev_hash", "hash")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    id: int
    at_unix_nano: int
    actor: str
    action: str
    object: str
    before: str
    after: str
    reason: str
    prev_hash: str
    hash: str
    def __init__(self, id: _Optional[int] = ..., at_unix_nano: _Optional[int] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., object: _Optional[str] = ..., before: _Optional[str] = ..., after: _Optional[str] = ..., reason: _Optional[str] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("model_name", "limit", "page_token")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    limit: int
    page_token: str
    def __init__(self, model_name: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class VerifyAuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyAuditResponse(_message.Message):
    __slots__ = ("ok", "entries", "first_broken_id", "problem")
    OK_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    FIRST_BROKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    entries: int
    first_broken_id: int
    problem: str
    def __init__(self, ok: bool = ..., entries: _Optional[int] = ..., first_broken_id: _Optional[int] = ..., problem: _Optional[str] = ...) -> None: ...

class RegisterMetadata(_message.Message):
    __slots__ = ("name", "profile", "metrics_json", "sha256", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    profile: _summary_pb2.ReferenceProfile
    metrics_json: str
    sha256: str
    size: int
    def __init__(self, name: _Optional[str] = ..., profile: _Optional[_Union[_summary_pb2.ReferenceProfile, _Mapping]] = ..., metrics_json: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class RegisterChunk(_message.Message):
    __slots__ = ("metadata", "data")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    metadata: RegisterMetadata
    data: bytes
    def __init__(self, metadata: _Optional[_Union[RegisterMetadata, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "version", "sha256", "size", "schema_json", "has_profile", "data_name", "data_sha256", "data_rows", "metrics_json", "registered_by", "registered_unix_nano", "gate_passed", "gate_json", "gated_unix_nano", "stage", "stage_unix_nano", "retired_unix_nano", "retire_reason", "artifact_removed_unix_nano", "feature_names")
    class FeatureNamesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _summary_pb2.ColumnNames
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_summary_pb2.ColumnNames, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    HAS_PROFILE_FIELD_NUMBER: _ClassVar[int]
    DATA_NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_ROWS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_BY_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    GATE_PASSED_FIELD_NUMBER: _ClassVar[int]
    GATE_JSON_FIELD_NUMBER: _ClassVar[int]
    GATED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    RETIRED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    RETIRE_REASON_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_REMOVED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    sha256: str
    size: int
    schema_json: str
    has_profile: bool
    data_name: str
    data_sha256: str
    data_rows: int
    metrics_json: str
    registered_by: str
    registered_unix_nano: int
    gate_passed: bool
    gate_json: str
    gated_unix_nano: int
    stage: str
    stage_unix_nano: int
    retired_unix_nano: int
    retire_reason: str
    artifact_removed_unix_nano: int
    feature_names: _containers.MessageMap[str, _summary_pb2.ColumnNames]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., schema_json: _Optional[str] = ..., has_profile: bool = ..., data_name: _Optional[str] = ..., data_sha256: _Optional[str] = ..., data_rows: _Optional[int] = ..., metrics_json: _Optional[str] = ..., registered_by: _Optional[str] = ..., registered_unix_nano: _Optional[int] = ..., gate_passed: bool = ..., gate_json: _Optional[str] = ..., gated_unix_nano: _Optional[int] = ..., stage: _Optional[str] = ..., stage_unix_nano: _Optional[int] = ..., retired_unix_nano: _Optional[int] = ..., retire_reason: _Optional[str] = ..., artifact_removed_unix_nano: _Optional[int] = ..., feature_names: _Optional[_Mapping[str, _summary_pb2.ColumnNames]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("name", "page_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    page_token: str
    def __init__(self, name: _Optional[str] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("versions", "next_page_token")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    next_page_token: str
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ModelVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SetStageRequest(_message.Message):
    __slots__ = ("name", "version", "stage", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    stage: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., stage: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PromotionRequest(_message.Message):
    __slots__ = ("name", "version", "reason", "override_gate_reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_GATE_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    reason: str
    override_gate_reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ..., override_gate_reason: _Optional[str] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("id", "model_name", "version", "requested_by", "requested_unix_nano", "reason", "state", "decided_by", "decided_unix_nano", "decision_reason", "gate_override_reason", "kind")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    DECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    GATE_OVERRIDE_REASON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    id: int
    model_name: str
    version: int
    requested_by: str
    requested_unix_nano: int
    reason: str
    state: str
    decided_by: str
    decided_unix_nano: int
    decision_reason: str
    gate_override_reason: str
    kind: str
    def __init__(self, id: _Optional[int] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., requested_by: _Optional[str] = ..., requested_unix_nano: _Optional[int] = ..., reason: _Optional[str] = ..., state: _Optional[str] = ..., decided_by: _Optional[str] = ..., decided_unix_nano: _Optional[int] = ..., decision_reason: _Optional[str] = ..., gate_override_reason: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class ListApprovalsRequest(_message.Message):
    __slots__ = ("include_decided", "model_name", "page_token")
    INCLUDE_DECIDED_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    include_decided: bool
    model_name: str
    page_token: str
    def __init__(self, include_decided: bool = ..., model_name: _Optional[str] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApprovalsResponse(_message.Message):
    __slots__ = ("approvals", "next_page_token")
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[Approval]
    next_page_token: str
    def __init__(self, approvals: _Optional[_Iterable[_Union[Approval, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DecisionRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: int
    reason: str
    def __init__(self, id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RetireRequest(_message.Message):
    __slots__ = ("name", "version", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RetrainingRequest(_message.Message):
    __slots__ = ("id", "model_name", "model_version", "state", "opened_by", "opened_unix_nano", "reason", "evidence_json", "decided_by", "decided_unix_nano", "completed_version", "note")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPENED_BY_FIELD_NUMBER: _ClassVar[int]
    OPENED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_JSON_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_VERSION_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    id: int
    model_name: str
    model_version: str
    state: str
    opened_by: str
    opened_unix_nano: int
    reason: str
    evidence_json: str
    decided_by: str
    decided_unix_nano: int
    completed_version: int
    note: str
    def __init__(self, id: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., state: _Optional[str] = ..., opened_by: _Optional[str] = ..., opened_unix_nano: _Optional[int] = ..., reason: _Optional[str] = ..., evidence_json: _Optional[str] = ..., decided_by: _Optional[str] = ..., decided_unix_nano: _Optional[int] = ..., completed_version: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class OpenRetrainingRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    reason: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListRetrainingRequest(_message.Message):
    __slots__ = ("include_closed", "model_name", "page_token")
    INCLUDE_CLOSED_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    include_closed: bool
    model_name: str
    page_token: str
    def __init__(self, include_closed: bool = ..., model_name: _Optional[str] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRetrainingResponse(_message.Message):
    __slots__ = ("requests", "next_page_token")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RetrainingRequest]
    next_page_token: str
    def __init__(self, requests: _Optional[_Iterable[_Union[RetrainingRequest, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RetrainingChange(_message.Message):
    __slots__ = ("id", "reason", "version")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    id: int
    reason: str
    version: int
    def __init__(self, id: _Optional[int] = ..., reason: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
