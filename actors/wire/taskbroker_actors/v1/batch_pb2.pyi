from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2 as _taskbroker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FetchTasksRequest(_message.Message):
    __slots__ = ("application", "namespace", "max_tasks", "wait_ms")
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    application: str
    namespace: str
    max_tasks: int
    wait_ms: int
    def __init__(self, application: _Optional[str] = ..., namespace: _Optional[str] = ..., max_tasks: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class FetchTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_taskbroker_pb2.TaskActivation]
    def __init__(self, tasks: _Optional[_Iterable[_Union[_taskbroker_pb2.TaskActivation, _Mapping]]] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("id", "status", "max_attempts", "delay_on_retry")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DELAY_ON_RETRY_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: _taskbroker_pb2.TaskActivationStatus
    max_attempts: int
    delay_on_retry: int
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[_taskbroker_pb2.TaskActivationStatus, str]] = ..., max_attempts: _Optional[int] = ..., delay_on_retry: _Optional[int] = ...) -> None: ...

class ReportResultsRequest(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TaskResult]
    def __init__(self, results: _Optional[_Iterable[_Union[TaskResult, _Mapping]]] = ...) -> None: ...

class ReportResultsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportAndFetchRequest(_message.Message):
    __slots__ = ("results", "fetch")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TaskResult]
    fetch: FetchTasksRequest
    def __init__(self, results: _Optional[_Iterable[_Union[TaskResult, _Mapping]]] = ..., fetch: _Optional[_Union[FetchTasksRequest, _Mapping]] = ...) -> None: ...
