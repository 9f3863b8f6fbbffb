"""Generated protobuf and gRPC code for the wire protocol (the contract is WIRE.md).

The sources are the `.proto` files in `proto/`; regenerate with
`python -m actors.wire.regenerate`. Import the modules by their full path, e.g.
`from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2`; this package imports
nothing itself, so importing it registers no descriptors.
"""
