"""The one error hierarchy of cdrsync; the class of an error decides where its record goes.

CdrsyncError
├── ConfigError                  bad topics.yaml / sites/*.yaml / environment: stop at start-up
├── VersionConflictError         the target changed since our last write: conflicts topic, for review
├── RetryableError               try again later: in-process retries (two unless unavailable), then retry topics
│   ├── TargetUnavailableError   connection refused, timeout, 408, 429, 5xx
│   └── ReferenceNotReadyError   the target does not (yet) hold a referenced resource
└── PermanentError               retrying cannot help: dead-letter topic with the reason
    ├── EnvelopeError            not a Debezium change event we understand
    ├── MappingError             source content cannot become a valid FHIR R4 resource
    ├── OversizeError            a source record larger than the configured limit
    ├── SchemaError              an Avro record that does not match its schema
    └── RejectedByTargetError    the target refused the write (4xx other than the above)
        └── TargetAuthError      401/403: the target does not accept our credentials
"""

from __future__ import annotations

__all__ = [
    "CdrsyncError",
    "ConfigError",
    "EnvelopeError",
    "MappingError",
    "OversizeError",
    "PermanentError",
    "ReferenceNotReadyError",
    "RejectedByTargetError",
    "RetryableError",
    "SchemaError",
    "TargetAuthError",
    "TargetUnavailableError",
    "VersionConflictError",
    "shape",
]


def shape(value: object, limit: int = 40) -> str:
    """A value's shape, for an error message that must not carry patient data (a birth date, a result): each
    digit as 9, each letter as A, the rest as it is, quoted ('9999-99-99' for a date written with dashes)."""
    text = str(value)
    masked = "".join("9" if c.isdigit() else "A" if c.isalpha() else c for c in text[:limit])
    return repr(masked + ("..." if len(text) > limit else ""))


class CdrsyncError(Exception):
    """Base of every error cdrsync raises on purpose."""

    #: short, stable name used in metrics labels, dead-letter headers and audit events
    error_class = "error"


class ConfigError(CdrsyncError):
    """A configuration file or setting is invalid; the message names the file, field and reason."""

    error_class = "config"


class RetryableError(CdrsyncError):
    """The operation may succeed later."""

    error_class = "retryable"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TargetUnavailableError(RetryableError):
    """The target CDR could not be reached or answered with a transient status."""

    error_class = "target_unavailable"


class ReferenceNotReadyError(RetryableError):
    """The target rejected a write because a resource it references is not there yet."""

    error_class = "reference_not_ready"


class AwaitedWriteError(RetryableError):
    """A write that waits for another one, which may take hours: a delete after an identity move for the write the
    previous Patient's sink still owes (pipeline/sink.py `_delete`), a move for the Patient now named to hold the
    site's patient (pipeline/patientmove.py, e.g. while that patient's own identity review is open). Retried past
    the retry tiers, in the last one, for `await_write_seconds`, then a dead letter."""

    error_class = "awaited_write"


class VersionConflictError(CdrsyncError):
    """The target resource changed since cdrsync last wrote it: the change is not applied but kept,
    with the target's version, for clinical review (DESIGN.md decision 8). Neither retried nor dead-lettered."""

    error_class = "conflict"

    def __init__(self, message: str, *, current: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.current = current


class PermanentError(CdrsyncError):
    """Retrying the same input cannot succeed."""

    error_class = "permanent"


class EnvelopeError(PermanentError):
    """The Kafka record is not a Debezium change event of a known source table."""

    error_class = "envelope"


class MappingError(PermanentError):
    """The source content cannot be turned into a valid FHIR R4 resource."""

    error_class = "mapping"


class OversizeError(PermanentError):
    """A source record is larger than CDRSYNC_MAX_RECORD_BYTES: kept whole in the dead letters, not carried."""

    error_class = "oversize"


class SchemaError(PermanentError):
    """An Avro-encoded record does not decode with any known schema."""

    error_class = "schema"


class RejectedByTargetError(PermanentError):
    """The target CDR refused the resource (validation failure or other 4xx)."""

    error_class = "rejected_by_target"

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class TargetAuthError(RejectedByTargetError):
    """The target refused our credentials (401/403): the record is fine, the token is not; alerted at once."""

    error_class = "target_auth"
