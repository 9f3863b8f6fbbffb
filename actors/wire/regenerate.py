"""Regenerate the protobuf and gRPC code under `actors/wire/` from the files in `proto/`.

    .venv/bin/python -m actors.wire.regenerate

Runs grpcio-tools' protoc (the pinned test dependency) on every `.proto` under `proto/`,
then makes the output importable from inside this package: protoc writes imports for a
top-level `sentry_protos` / `taskbroker_actors` / `grpc.health` package, rewritten here to `actors.wire.*`.
The descriptors keep their proto names (`sentry_protos.taskbroker.v1.*`), so the wire
format and the gRPC method paths are untouched. protoc writes no type stubs for the
`_pb2_grpc` modules; this module writes them from the service descriptors, so that the
gRPC frontend and clients type-check under mypy strict.

The output is committed; `tests/test_wire.py` regenerates into a temporary directory and
fails when the committed code differs. Only this module is written by hand here.
"""

from __future__ import annotations

import importlib.resources
import re
import shutil
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

WIRE_ROOT = Path(__file__).resolve().parent
PROTO_ROOT = WIRE_ROOT.parent.parent / "proto"
PACKAGE = "actors.wire"

# The hand-written files of WIRE_ROOT; everything else below it is generated.
_HAND_WRITTEN = frozenset({"__init__.py", "regenerate.py"})

# protoc's imports of our own generated modules, at any indentation.
_OWN_IMPORT = re.compile(
    r"^(\s*)from (sentry_protos|taskbroker_actors|grpc\.health)([. ])", re.MULTILINE
)


class GenerationError(RuntimeError):
    """protoc refused the .proto files, or they use what the stub writer cannot type."""


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the generated tree for every `.proto` under `proto_root` into `out_dir`.

    Returns the written paths, relative to `out_dir`, sorted.
    """
    protos = sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))
    if not protos:
        raise GenerationError(f"no .proto files under {proto_root}")
    with tempfile.TemporaryDirectory() as scratch:
        descriptor_set = Path(scratch) / "descriptors.pb"
        _protoc(proto_root, out_dir, descriptor_set, protos)
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file

    for path in out_dir.rglob("*.py*"):
        path.write_text(_OWN_IMPORT.sub(rf"\1from {PACKAGE}.\2\3", path.read_text()))
    for file in files:
        if file.service:
            stub = out_dir / (file.name.removesuffix(".proto") + "_pb2_grpc.pyi")
            stub.write_text(_grpc_stub(file))
    for proto in protos:
        package_dir = out_dir
        for part in Path(proto).parent.parts:
            package_dir /= part
            (package_dir / "__init__.py").touch()
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())


def generated_files(root: Path) -> dict[Path, bytes]:
    """The generated part of a tree like WIRE_ROOT: relative path → content."""
    return {
        path.relative_to(root): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and "__pycache__" not in path.parts
        and not (path.parent == root and path.name in _HAND_WRITTEN)
    }


def main() -> None:
    """Replace the generated code under WIRE_ROOT with a fresh generation."""
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        written = generate(fresh)
        for child in WIRE_ROOT.iterdir():
            # Whole generated packages go, so that code of a deleted .proto goes with them.
            if child.is_dir() and child.name != "__pycache__":
                shutil.rmtree(child)
        for relative in written:
            target = WIRE_ROOT / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fresh / relative, target)
    for relative in written:
        print(f"wrote actors/wire/{relative.as_posix()}")


def _protoc(proto_root: Path, out_dir: Path, descriptor_set: Path, protos: list[str]) -> None:
    # Imported here: grpcio-tools is a test/dev dependency, absent from a broker install.
    from grpc_tools import protoc  # noqa: PLC0415

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={proto_root}",
            f"--proto_path={well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--descriptor_set_out={descriptor_set}",
            *protos,
        ]
    )
    if status != 0:
        raise GenerationError(f"protoc exited with status {status}")


_STUB_PRELUDE = '''\
"""Type stubs for the gRPC classes of {source}."""

from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import grpc

from {module} import {pb2} as _pb2

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Metadata = Sequence[tuple[str, str | bytes]]

class _UnaryUnary(Generic[_Request, _Response]):
    def __call__(
        self,
        request: _Request,
        timeout: float | None = ...,
        metadata: _Metadata | None = ...,
        credentials: grpc.CallCredentials | None = ...,
        wait_for_ready: bool | None = ...,
        compression: grpc.Compression | None = ...,
    ) -> _Response: ...
    def with_call(
        self,
        request: _Request,
        timeout: float | None = ...,
        metadata: _Metadata | None = ...,
        credentials: grpc.CallCredentials | None = ...,
        wait_for_ready: bool | None = ...,
        compression: grpc.Compression | None = ...,
    ) -> tuple[_Response, grpc.Call]: ...
    def future(
        self,
        request: _Request,
        timeout: float | None = ...,
        metadata: _Metadata | None = ...,
        credentials: grpc.CallCredentials | None = ...,
        wait_for_ready: bool | None = ...,
        compression: grpc.Compression | None = ...,
    ) -> Any: ...

class _UnaryStream(Generic[_Request, _Response]):
    def __call__(
        self,
        request: _Request,
        timeout: float | None = ...,
        metadata: _Metadata | None = ...,
        credentials: grpc.CallCredentials | None = ...,
        wait_for_ready: bool | None = ...,
        compression: grpc.Compression | None = ...,
    ) -> Iterator[_Response]: ...
'''


def _grpc_stub(file: descriptor_pb2.FileDescriptorProto) -> str:
    """The `.pyi` of one `_pb2_grpc` module: its stub, servicer and registration function."""
    module_path, _, pb2 = file.name.removesuffix(".proto").rpartition("/")
    module = ".".join([PACKAGE, *module_path.split("/")]) if module_path else PACKAGE
    lines = [
        f"# Generated by {PACKAGE}.regenerate from {file.name}. DO NOT EDIT!",
        _STUB_PRELUDE.format(source=file.name, module=module, pb2=f"{pb2}_pb2"),
    ]
    for service in file.service:
        stub = [
            f"class {service.name}Stub:",
            "    def __init__(self, channel: grpc.Channel) -> None: ...",
        ]
        servicer = [f"class {service.name}Servicer:"]
        for method in service.method:
            if method.client_streaming:
                raise GenerationError(f"{service.name}.{method.name}: client streaming")
            request = _python_type(file, method.input_type)
            response = _python_type(file, method.output_type)
            call = "_UnaryStream" if method.server_streaming else "_UnaryUnary"
            returns = f"Iterator[{response}]" if method.server_streaming else response
            stub.append(f"    {method.name}: {call}[{request}, {response}]")
            servicer.append(
                f"    def {method.name}(\n"
                f"        self, request: {request}, context: grpc.ServicerContext\n"
                f"    ) -> {returns}: ..."
            )
        lines += [
            "\n".join(stub),
            "",
            "\n".join(servicer),
            "",
            f"def add_{service.name}Servicer_to_server(\n"
            f"    servicer: {service.name}Servicer, server: grpc.Server\n"
            ") -> None: ...",
            "",
        ]
    return "\n".join(lines)


def _python_type(file: descriptor_pb2.FileDescriptorProto, full_name: str) -> str:
    """`.pkg.Outer.Inner` → `_pb2.Outer.Inner`, for a message defined in `file` itself."""
    name = full_name.removeprefix(f".{file.package}.")
    if name.split(".")[0] not in {message.name for message in file.message_type}:
        raise GenerationError(f"{file.name}: {full_name} is not defined in this file")
    return f"_pb2.{name}"


if __name__ == "__main__":
    main()
