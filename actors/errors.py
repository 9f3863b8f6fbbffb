"""The broker's own errors. Adapters translate sqlite3, confluent-kafka and grpc errors
into these at one boundary, so callers decide on the class, never on a library's message.
"""


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""


class RecoverableError(BrokerError):
    """The same call may succeed later (a full disk freed, a broker back, a mailbox drained)."""


class MailboxFull(RecoverableError):
    """An actor's mailbox refused a message under its overflow policy."""


class StoreError(BrokerError):
    """The SQLite store cannot be used at all (corrupt file, unreadable, wrong schema)."""


class StoreUnavailable(RecoverableError):
    """A write to the SQLite store failed for now (disk full, I/O error, locked)."""


class KafkaUnavailable(RecoverableError):
    """Kafka did not accept or acknowledge a message in time."""


class ConfigError(BrokerError, ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


class ActorUnavailable(RecoverableError):
    """An actor did not answer an ask in time, or is stopped."""
