"""An actor-model task broker wire-compatible with `sentry_protos.taskbroker.v1`."""
