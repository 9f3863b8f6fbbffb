import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskActivationStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_ACTIVATION_STATUS_UNSPECIFIED: _ClassVar[TaskActivationStatus]
    TASK_ACTIVATION_STATUS_PENDING: _ClassVar[TaskActivationStatus]
    TASK_ACTIVATION_STATUS_PROCESSING: _ClassVar[TaskActivationStatus]
    TASK_ACTIVATION_STATUS_FAILURE: _ClassVar[TaskActivationStatus]
    TASK_ACTIVATION_STATUS_RETRY: _ClassVar[TaskActivationStatus]
    TASK_ACTIVATION_STATUS_COMPLETE: _ClassVar[TaskActivationStatus]

class OnAttemptsExceeded(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_ATTEMPTS_EXCEEDED_UNSPECIFIED: _ClassVar[OnAttemptsExceeded]
    ON_ATTEMPTS_EXCEEDED_DISCARD: _ClassVar[OnAttemptsExceeded]
    ON_ATTEMPTS_EXCEEDED_DEADLETTER: _ClassVar[OnAttemptsExceeded]
TASK_ACTIVATION_STATUS_UNSPECIFIED: TaskActivationStatus
TASK_ACTIVATION_STATUS_PENDING: TaskActivationStatus
TASK_ACTIVATION_STATUS_PROCESSING: TaskActivationStatus
TASK_ACTIVATION_STATUS_FAILURE: TaskActivationStatus
TASK_ACTIVATION_STATUS_RETRY: TaskActivationStatus
TASK_ACTIVATION_STATUS_COMPLETE: TaskActivationStatus
ON_ATTEMPTS_EXCEEDED_UNSPECIFIED: OnAttemptsExceeded
ON_ATTEMPTS_EXCEEDED_DISCARD: OnAttemptsExceeded
ON_ATTEMPTS_EXCEEDED_DEADLETTER: OnAttemptsExceeded

class RetryState(_message.Message):
    __slots__ = ("attempts", "max_attempts", "on_attempts_exceeded", "at_most_once", "delay_on_retry")
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ON_ATTEMPTS_EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    AT_MOST_ONCE_FIELD_NUMBER: _ClassVar[int]
    DELAY_ON_RETRY_FIELD_NUMBER: _ClassVar[int]
    attempts: int
    max_attempts: int
    on_attempts_exceeded: OnAttemptsExceeded
    at_most_once: bool
    delay_on_retry: int
    def __init__(self, attempts: _Optional[int] = ..., max_attempts: _Optional[int] = ..., on_attempts_exceeded: _Optional[_Union[OnAttemptsExceeded, str]] = ..., at_most_once: _Optional[bool] = ..., delay_on_retry: _Optional[int] = ...) -> None: ...

class TaskActivation(_message.Message):
    __slots__ = ("id", "namespace", "taskname", "parameters", "headers", "received_at", "retry_state", "processing_deadline_duration", "expires", "delay", "application", "parameters_bytes")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TASKNAME_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    RETRY_STATE_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_DEADLINE_DURATION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    namespace: str
    taskname: str
    parameters: str
    headers: _containers.ScalarMap[str, str]
    received_at: _timestamp_pb2.Timestamp
    retry_state: RetryState
    processing_deadline_duration: int
    expires: int
    delay: int
    application: str
    parameters_bytes: bytes
    def __init__(self, id: _Optional[str] = ..., namespace: _Optional[str] = ..., taskname: _Optional[str] = ..., parameters: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retry_state: _Optional[_Union[RetryState, _Mapping]] = ..., processing_deadline_duration: _Optional[int] = ..., expires: _Optional[int] = ..., delay: _Optional[int] = ..., application: _Optional[str] = ..., parameters_bytes: _Optional[bytes] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("namespace", "application")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    application: str
    def __init__(self, namespace: _Optional[str] = ..., application: _Optional[str] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: TaskActivation
    def __init__(self, task: _Optional[_Union[TaskActivation, _Mapping]] = ...) -> None: ...

class FetchNextTask(_message.Message):
    __slots__ = ("namespace", "application")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    application: str
    def __init__(self, namespace: _Optional[str] = ..., application: _Optional[str] = ...) -> None: ...

class SetTaskStatusRequest(_message.Message):
    __slots__ = ("id", "status", "fetch_next_task", "max_attempts", "delay_on_retry")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FETCH_NEXT_TASK_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DELAY_ON_RETRY_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: TaskActivationStatus
    fetch_next_task: FetchNextTask
    max_attempts: int
    delay_on_retry: int
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[TaskActivationStatus, str]] = ..., fetch_next_task: _Optional[_Union[FetchNextTask, _Mapping]] = ..., max_attempts: _Optional[int] = ..., delay_on_retry: _Optional[int] = ...) -> None: ...

class SetTaskStatusResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: TaskActivation
    def __init__(self, task: _Optional[_Union[TaskActivation, _Mapping]] = ...) -> None: ...

class SetBatchActivationStatusRequest(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[SetTaskStatusRequest]
    def __init__(self, updates: _Optional[_Iterable[_Union[SetTaskStatusRequest, _Mapping]]] = ...) -> None: ...

class SetBatchActivationStatusResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PushTaskRequest(_message.Message):
    __slots__ = ("task", "callback_url")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    task: TaskActivation
    callback_url: str
    def __init__(self, task: _Optional[_Union[TaskActivation, _Mapping]] = ..., callback_url: _Optional[str] = ...) -> None: ...

class PushTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
