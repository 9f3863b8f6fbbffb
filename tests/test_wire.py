"""The generated wire code against the contract in WIRE.md, and against its .proto sources.

The tables below are written from WIRE.md, not from the .proto files: a field renumbered
or retyped in `proto/` breaks existing workers, and must break a test first.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from actors.wire import regenerate
from actors.wire.grpc.health.v1 import health_pb2, health_pb2_grpc
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2, taskbroker_pb2_grpc
from actors.wire.taskbroker_actors.v1 import batch_pb2, batch_pb2_grpc

TB = "sentry_protos.taskbroker.v1"
F = FieldDescriptor

# (method path, request type, response type, server streaming)
METHODS = [
    (f"/{TB}.ConsumerService/GetTask", f"{TB}.GetTaskRequest", f"{TB}.GetTaskResponse", False),
    (
        f"/{TB}.ConsumerService/SetTaskStatus",
        f"{TB}.SetTaskStatusRequest",
        f"{TB}.SetTaskStatusResponse",
        False,
    ),
    (
        f"/{TB}.ConsumerService/SetBatchActivationStatus",
        f"{TB}.SetBatchActivationStatusRequest",
        f"{TB}.SetBatchActivationStatusResponse",
        False,
    ),
    (
        f"/{TB}.WorkerService/PushTask",
        f"{TB}.PushTaskRequest",
        f"{TB}.PushTaskResponse",
        False,
    ),
    (
        "/grpc.health.v1.Health/Check",
        "grpc.health.v1.HealthCheckRequest",
        "grpc.health.v1.HealthCheckResponse",
        False,
    ),
    (
        "/grpc.health.v1.Health/Watch",
        "grpc.health.v1.HealthCheckRequest",
        "grpc.health.v1.HealthCheckResponse",
        True,
    ),
]


class Field(NamedTuple):
    message: str
    name: str
    number: int
    type: int
    # "singular" (proto3 implicit presence, or a plain message field), "optional" (the
    # proto3 `optional` keyword), "repeated", "map".
    cardinality: str
    # The full name of the field's message or enum type; None for scalars and maps.
    type_name: str | None


FIELDS = [
    Field("TaskActivation", "id", 1, F.TYPE_STRING, "singular", None),
    Field("TaskActivation", "namespace", 2, F.TYPE_STRING, "singular", None),
    Field("TaskActivation", "taskname", 3, F.TYPE_STRING, "singular", None),
    Field("TaskActivation", "parameters", 4, F.TYPE_STRING, "singular", None),
    Field("TaskActivation", "headers", 5, F.TYPE_MESSAGE, "map", None),
    Field(
        "TaskActivation",
        "received_at",
        6,
        F.TYPE_MESSAGE,
        "singular",
        "google.protobuf.Timestamp",
    ),
    Field("TaskActivation", "retry_state", 7, F.TYPE_MESSAGE, "singular", f"{TB}.RetryState"),
    Field("TaskActivation", "processing_deadline_duration", 8, F.TYPE_UINT64, "singular", None),
    Field("TaskActivation", "expires", 9, F.TYPE_UINT64, "optional", None),
    Field("TaskActivation", "delay", 11, F.TYPE_UINT64, "optional", None),
    Field("TaskActivation", "application", 12, F.TYPE_STRING, "optional", None),
    Field("TaskActivation", "parameters_bytes", 13, F.TYPE_BYTES, "singular", None),
    Field("RetryState", "attempts", 1, F.TYPE_UINT32, "singular", None),
    Field("RetryState", "max_attempts", 2, F.TYPE_UINT32, "singular", None),
    Field(
        "RetryState",
        "on_attempts_exceeded",
        3,
        F.TYPE_ENUM,
        "singular",
        f"{TB}.OnAttemptsExceeded",
    ),
    Field("RetryState", "at_most_once", 4, F.TYPE_BOOL, "optional", None),
    Field("RetryState", "delay_on_retry", 5, F.TYPE_UINT64, "optional", None),
    Field("GetTaskRequest", "namespace", 1, F.TYPE_STRING, "optional", None),
    Field("GetTaskRequest", "application", 2, F.TYPE_STRING, "optional", None),
    Field("GetTaskResponse", "task", 1, F.TYPE_MESSAGE, "optional", f"{TB}.TaskActivation"),
    Field("FetchNextTask", "namespace", 1, F.TYPE_STRING, "optional", None),
    Field("FetchNextTask", "application", 2, F.TYPE_STRING, "optional", None),
    Field("SetTaskStatusRequest", "id", 1, F.TYPE_STRING, "singular", None),
    Field(
        "SetTaskStatusRequest",
        "status",
        2,
        F.TYPE_ENUM,
        "singular",
        f"{TB}.TaskActivationStatus",
    ),
    Field(
        "SetTaskStatusRequest",
        "fetch_next_task",
        3,
        F.TYPE_MESSAGE,
        "optional",
        f"{TB}.FetchNextTask",
    ),
    Field("SetTaskStatusRequest", "max_attempts", 4, F.TYPE_UINT32, "optional", None),
    Field("SetTaskStatusRequest", "delay_on_retry", 5, F.TYPE_UINT64, "optional", None),
    Field("SetTaskStatusResponse", "task", 1, F.TYPE_MESSAGE, "optional", f"{TB}.TaskActivation"),
    Field(
        "SetBatchActivationStatusRequest",
        "updates",
        1,
        F.TYPE_MESSAGE,
        "repeated",
        f"{TB}.SetTaskStatusRequest",
    ),
    Field("PushTaskRequest", "task", 1, F.TYPE_MESSAGE, "singular", f"{TB}.TaskActivation"),
    Field("PushTaskRequest", "callback_url", 2, F.TYPE_STRING, "singular", None),
]

EMPTY_MESSAGES = ["SetBatchActivationStatusResponse", "PushTaskResponse"]

ENUMS = {
    "TaskActivationStatus": [
        ("TASK_ACTIVATION_STATUS_UNSPECIFIED", 0),
        ("TASK_ACTIVATION_STATUS_PENDING", 1),
        ("TASK_ACTIVATION_STATUS_PROCESSING", 2),
        ("TASK_ACTIVATION_STATUS_FAILURE", 3),
        ("TASK_ACTIVATION_STATUS_RETRY", 4),
        ("TASK_ACTIVATION_STATUS_COMPLETE", 5),
    ],
    "OnAttemptsExceeded": [
        ("ON_ATTEMPTS_EXCEEDED_UNSPECIFIED", 0),
        ("ON_ATTEMPTS_EXCEEDED_DISCARD", 1),
        ("ON_ATTEMPTS_EXCEEDED_DEADLETTER", 2),
    ],
}

SERVING_STATUS = [("UNKNOWN", 0), ("SERVING", 1), ("NOT_SERVING", 2), ("SERVICE_UNKNOWN", 3)]


def _message(name: str) -> Descriptor:
    descriptor: Descriptor = getattr(taskbroker_pb2, name).DESCRIPTOR
    return descriptor


def _cardinality(field: FieldDescriptor) -> str:
    if field.is_repeated:
        entry = field.message_type
        return "map" if entry is not None and entry.GetOptions().map_entry else "repeated"
    oneof = field.containing_oneof
    # proto3 `optional` is a synthetic one-field oneof named after the field.
    if oneof is not None and oneof.name == f"_{field.name}" and len(oneof.fields) == 1:
        return "optional"
    return "singular"


def _type_name(field: FieldDescriptor) -> str | None:
    if field.enum_type is not None:
        return str(field.enum_type.full_name)
    if field.message_type is not None and _cardinality(field) != "map":
        return str(field.message_type.full_name)
    return None


def test_packages_keep_their_proto_names() -> None:
    assert taskbroker_pb2.DESCRIPTOR.package == TB
    assert health_pb2.DESCRIPTOR.package == "grpc.health.v1"
    assert _message("TaskActivation").full_name == f"{TB}.TaskActivation"


@pytest.mark.parametrize(("path", "request_type", "response_type", "streaming"), METHODS)
def test_method(path: str, request_type: str, response_type: str, streaming: bool) -> None:
    _, service_name, method_name = path.split("/")
    package, _, service = service_name.rpartition(".")
    module = taskbroker_pb2 if package == TB else health_pb2
    method = module.DESCRIPTOR.services_by_name[service].methods_by_name[method_name]
    assert f"/{method.containing_service.full_name}/{method.name}" == path
    assert method.input_type.full_name == request_type
    assert method.output_type.full_name == response_type
    assert method.server_streaming is streaming
    assert method.client_streaming is False


def test_services_have_no_other_methods() -> None:
    declared = {
        f"/{service.full_name}/{method.name}"
        for module in (taskbroker_pb2, health_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert declared == {path for path, *_ in METHODS}


@pytest.mark.parametrize("expected", FIELDS, ids=lambda f: f"{f.message}.{f.name}")
def test_field(expected: Field) -> None:
    field = _message(expected.message).fields_by_name[expected.name]
    assert field.number == expected.number
    assert field.type == expected.type
    assert _cardinality(field) == expected.cardinality
    assert _type_name(field) == expected.type_name
    # Workers tell "absent" from "zero" exactly on these fields.
    expected_presence = expected.cardinality == "optional" or (
        expected.cardinality == "singular" and expected.type == F.TYPE_MESSAGE
    )
    assert field.has_presence is expected_presence


def test_messages_have_no_other_fields() -> None:
    declared = {
        (message.name, field.name)
        for message in taskbroker_pb2.DESCRIPTOR.message_types_by_name.values()
        for field in message.fields
    }
    assert declared == {(field.message, field.name) for field in FIELDS}
    assert set(taskbroker_pb2.DESCRIPTOR.message_types_by_name) == {
        *(field.message for field in FIELDS),
        *EMPTY_MESSAGES,
    }


def test_headers_are_a_string_map() -> None:
    entry = _message("TaskActivation").fields_by_name["headers"].message_type
    assert entry is not None
    assert entry.fields_by_name["key"].type == F.TYPE_STRING
    assert entry.fields_by_name["value"].type == F.TYPE_STRING


@pytest.mark.parametrize("enum_name", sorted(ENUMS))
def test_enum(enum_name: str) -> None:
    enum = taskbroker_pb2.DESCRIPTOR.enum_types_by_name[enum_name]
    assert enum.full_name == f"{TB}.{enum_name}"
    assert [(value.name, value.number) for value in enum.values] == ENUMS[enum_name]


def test_health_messages() -> None:
    request = health_pb2.HealthCheckRequest.DESCRIPTOR.fields_by_name["service"]
    assert (request.number, request.type, request.has_presence) == (1, F.TYPE_STRING, False)
    status = health_pb2.HealthCheckResponse.DESCRIPTOR.fields_by_name["status"]
    assert (status.number, status.type) == (1, F.TYPE_ENUM)
    assert status.enum_type is not None
    assert status.enum_type.full_name == "grpc.health.v1.HealthCheckResponse.ServingStatus"
    assert [(value.name, value.number) for value in status.enum_type.values] == SERVING_STATUS


class _Consumer(taskbroker_pb2_grpc.ConsumerServiceServicer):
    def GetTask(  # noqa: N802 (named by the proto)
        self, request: taskbroker_pb2.GetTaskRequest, context: grpc.ServicerContext
    ) -> taskbroker_pb2.GetTaskResponse:
        return taskbroker_pb2.GetTaskResponse(
            task=taskbroker_pb2.TaskActivation(id="t1", application=request.application)
        )


class _Health(health_pb2_grpc.HealthServicer):
    def Watch(  # noqa: N802 (named by the proto)
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def channel() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    taskbroker_pb2_grpc.add_ConsumerServiceServicer_to_server(_Consumer(), server)
    health_pb2_grpc.add_HealthServicer_to_server(_Health(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as client:
            yield client
    finally:
        server.stop(grace=None).wait(timeout=5)


def test_generated_servers_answer_on_the_contract_paths(channel: grpc.Channel) -> None:
    # Raw calls by path and bytes, as a worker built on other generated code makes them.
    get_task = channel.unary_unary(f"/{TB}.ConsumerService/GetTask")
    request = taskbroker_pb2.GetTaskRequest(application="app").SerializeToString()
    response = taskbroker_pb2.GetTaskResponse.FromString(get_task(request, timeout=5))
    assert (response.task.id, response.task.application) == ("t1", "app")

    watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
    first = next(iter(watch(b"", timeout=5)))
    assert health_pb2.HealthCheckResponse.FromString(first).status == 1

    # The generated servicer's default answers UNIMPLEMENTED: the path exists.
    set_status = channel.unary_unary(f"/{TB}.ConsumerService/SetTaskStatus")
    with pytest.raises(grpc.RpcError) as error:
        set_status(b"", timeout=5)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_generated_stubs_call_the_same_paths(channel: grpc.Channel) -> None:
    stub = taskbroker_pb2_grpc.ConsumerServiceStub(channel)
    response = stub.GetTask(taskbroker_pb2.GetTaskRequest(application="x"), timeout=5)
    assert response.task.application == "x"
    health = health_pb2_grpc.HealthStub(channel)
    first = next(iter(health.Watch(health_pb2.HealthCheckRequest(), timeout=5)))
    assert first.status == health_pb2.HealthCheckResponse.SERVING


def test_committed_code_is_what_the_protos_generate(tmp_path: Path) -> None:
    regenerate.generate(tmp_path)
    fresh = regenerate.generated_files(tmp_path)
    committed = regenerate.generated_files(regenerate.WIRE_ROOT)
    stale = sorted(
        str(path)
        for path in fresh.keys() | committed.keys()
        if fresh.get(path) != committed.get(path)
    )
    assert stale == [], "run `python -m actors.wire.regenerate` and commit the result"


@pytest.mark.parametrize("module", [taskbroker_pb2_grpc, health_pb2_grpc, batch_pb2_grpc])
def test_grpc_modules_import_from_inside_the_package(module: ModuleType) -> None:
    # protoc's own imports would name a top-level `sentry_protos` / `grpc.health` package.
    source = Path(str(module.__file__)).read_text()
    assert "\nfrom actors.wire." in source
    assert "\nfrom sentry_protos" not in source
    assert "\nfrom grpc.health" not in source


# --- Our batched worker API (taskbroker_actors.v1): ours to evolve, but not to renumber -----

BA = "taskbroker_actors.v1"

BATCH_METHODS = {
    "FetchTasks": (f"{BA}.FetchTasksRequest", f"{BA}.FetchTasksResponse"),
    "ReportResults": (f"{BA}.ReportResultsRequest", f"{BA}.ReportResultsResponse"),
    "ReportAndFetch": (f"{BA}.ReportAndFetchRequest", f"{BA}.FetchTasksResponse"),
}

# message -> [(field, number, type, cardinality, type name)]
BATCH_FIELDS: dict[str, list[tuple[str, int, int, str, str | None]]] = {
    "FetchTasksRequest": [
        ("application", 1, F.TYPE_STRING, "singular", None),
        ("namespace", 2, F.TYPE_STRING, "singular", None),
        ("max_tasks", 3, F.TYPE_UINT32, "singular", None),
        ("wait_ms", 4, F.TYPE_UINT32, "singular", None),
    ],
    "FetchTasksResponse": [("tasks", 1, F.TYPE_MESSAGE, "repeated", f"{TB}.TaskActivation")],
    # SetTaskStatusRequest's numbers, so that a result reads the same on both services.
    "TaskResult": [
        ("id", 1, F.TYPE_STRING, "singular", None),
        ("status", 2, F.TYPE_ENUM, "singular", f"{TB}.TaskActivationStatus"),
        ("max_attempts", 4, F.TYPE_UINT32, "optional", None),
        ("delay_on_retry", 5, F.TYPE_UINT64, "optional", None),
    ],
    "ReportResultsRequest": [("results", 1, F.TYPE_MESSAGE, "repeated", f"{BA}.TaskResult")],
    "ReportResultsResponse": [],
    "ReportAndFetchRequest": [
        ("results", 1, F.TYPE_MESSAGE, "repeated", f"{BA}.TaskResult"),
        ("fetch", 2, F.TYPE_MESSAGE, "singular", f"{BA}.FetchTasksRequest"),
    ],
}


def test_the_batch_service_has_exactly_its_unary_methods() -> None:
    service = batch_pb2.DESCRIPTOR.services_by_name["TaskBatchService"]
    assert service.full_name == f"{BA}.TaskBatchService"
    declared = {
        method.name: (method.input_type.full_name, method.output_type.full_name)
        for method in service.methods
        if not method.client_streaming and not method.server_streaming
    }
    assert declared == BATCH_METHODS
    assert len(service.methods) == len(BATCH_METHODS)


def test_the_batch_messages_have_exactly_their_fields() -> None:
    declared = {
        name: [(f.name, f.number, f.type, _cardinality(f), _type_name(f)) for f in message.fields]
        for name, message in batch_pb2.DESCRIPTOR.message_types_by_name.items()
    }
    assert declared == BATCH_FIELDS


def test_the_push_callback_url_is_deprecated() -> None:
    callback_url = _message("PushTaskRequest").fields_by_name["callback_url"]
    assert callback_url.GetOptions().deprecated
