"""A state actor behind a real gRPC front end on loopback, for tests that speak gRPC."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pykka

from actors.activation import decode_record, encode_activation
from actors.frontend import FrontendConfig, GrpcFrontend
from actors.messages import Ingest
from actors.records import KafkaOffset, Record
from actors.runtime import MailboxConfig
from actors.services import BatchLimits
from actors.state import StateActor, StateConfig
from actors.wire.grpc.health.v1 import health_pb2_grpc
from actors.wire.sentry_protos.taskbroker.v1 import taskbroker_pb2_grpc as pb_grpc

TIMEOUT_S = 5.0

_offsets = itertools.count()


def activation_record(activation_id: str, **fields: Any) -> Record:
    """A record whose bytes are a real serialized TaskActivation, decoded as ingest does."""
    fields.setdefault("application", "app")
    fields.setdefault("namespace", "ns")
    value = encode_activation(activation_id=activation_id, **fields)
    return decode_record(value, 0, next(_offsets), time.time(), max_delay_s=3600)


@dataclass
class Broker:
    state: pykka.ActorRef[StateActor]
    frontend: pykka.ActorRef[GrpcFrontend]
    channel: grpc.Channel

    @property
    def stub(self) -> pb_grpc.ConsumerServiceStub:
        return pb_grpc.ConsumerServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)

    def ingest(self, *records: Record) -> None:
        offsets = tuple(KafkaOffset(r.partition, r.offset) for r in records)
        self.state.tell(Ingest(records, offsets))

    def ask_state(self, message: object) -> Any:
        return self.state.ask(message, block=True, timeout=TIMEOUT_S)


StartBroker = Callable[..., Broker]


def broker_starter() -> Iterator[StartBroker]:
    """Yields a function that starts brokers; every one is stopped when the generator ends."""
    channels: list[grpc.Channel] = []

    def start(
        *,
        max_batch: int = FrontendConfig().max_batch,
        shared_secrets: tuple[str, ...] = (),
        state_ask_timeout_ms: int = 2000,
        state_mailbox: MailboxConfig | None = None,
        state_config: StateConfig | None = None,
        batch_limits: BatchLimits | None = None,
        pulls: bool = True,
    ) -> Broker:
        state = StateActor.start(
            state_config or StateConfig(), state_mailbox or MailboxConfig(size=1000)
        )
        config = FrontendConfig(
            host="127.0.0.1",
            port=0,
            max_workers=8,
            shared_secrets=shared_secrets,
            state_ask_timeout_ms=state_ask_timeout_ms,
            max_batch=max_batch,
            batch=batch_limits or BatchLimits(),
            pulls=pulls,
            stop_grace_s=1.0,
        )
        frontend = GrpcFrontend.start(config, state)
        port = frontend.proxy().port.get(timeout=TIMEOUT_S)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return Broker(state, frontend, channel)

    yield start
    for channel in channels:
        channel.close()
    pykka.ActorRegistry.stop_all(timeout=TIMEOUT_S)
