"""Records scm-relay writes: the task ledger, task outcomes and dead-letter headers.

Pure models (docs/design.md sections 2.2 and 2.3). The ledger record is what
`scm.tasks` holds for a submitted, unfinished task; the outcome is what
`scm.results` receives once per finished task; the dead-letter headers travel
with the untouched original bytes on `scm.dlq`.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, NonNegativeInt, field_validator

from service.core.reasons import Reason, Stage

SCHEMA_VERSION: Final = 1


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventSource(_Record):
    """Where an event carried by a task came from. An event cut across requests names
    which of its values this one carries: their indexes among the event's `total`
    values (absent: all of them)."""

    topic: str
    partition: NonNegativeInt
    offset: NonNegativeInt
    event_id: str | None = None
    values: list[NonNegativeInt] | None = None
    total: NonNegativeInt | None = None


class TaskLedgerRecord(_Record):
    """An unfinished task in the compacted `scm.tasks` topic, keyed by task id.

    Written in the same Kafka transaction as the input offsets it releases; its
    tombstone is written in the transaction that publishes the task's outcome.
    """

    model_config = ConfigDict(
        title="SCM task ledger record",
        json_schema_extra={
            "$comment": "Generated from service.core.records.TaskLedgerRecord; do not edit."
        },
    )

    schema_version: Literal[1] = SCHEMA_VERSION
    task_id: Annotated[str, Field(min_length=1)]
    batch_id: Annotated[str, Field(min_length=1)]
    submitted_at: AwareDatetime
    campaign: int | None
    reference: str
    scm_data: dict[str, str]
    constraints: Annotated[dict[str, list[str]], Field(min_length=1, max_length=5)]
    expected_codes: NonNegativeInt | None
    events: Annotated[list[EventSource], Field(min_length=1)]


INTENT_KEY_PREFIX: Final = "intent:"
# A partition's progress record (service/core/offsets.py): what is done above its
# commit point, written with the offsets; the latest one of each key is what counts.
PROGRESS_KEY_PREFIX: Final = "progress:"


def progress_key(topic: str, partition: int) -> str:
    """The ledger key of an input partition's progress record."""
    return f"{PROGRESS_KEY_PREFIX}{topic}:{partition}"


def intent_key(batch_id: str) -> str:
    """The ledger key of a batch's intent (task ids never start with it)."""
    return f"{INTENT_KEY_PREFIX}{batch_id}"


class IntentRecord(_Record):
    """A batch about to be uploaded, in `scm.tasks` under `intent:<batch id>`.

    Committed (with a fenced offset commit) before the upload is sent: the writer
    sends only before `send_by`; after `resolve_after` the owner of the partition of
    the first event may look the batch up by `api_reference`, adopt the task found, or
    upload it itself (docs/design.md section 11). Closed by an `IntentClosure`.
    """

    model_config = ConfigDict(
        title="SCM upload intent",
        json_schema_extra={
            "$comment": "Generated from service.core.records.IntentRecord; do not edit."
        },
    )

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["intent"] = "intent"
    batch_id: Annotated[str, Field(min_length=1)]
    api_reference: Annotated[str, Field(min_length=1)]
    written_at: AwareDatetime
    send_by: AwareDatetime
    resolve_after: AwareDatetime
    attempt: NonNegativeInt = 0
    campaign: int | None
    reference: str
    scm_data: dict[str, str]
    constraints: Annotated[dict[str, list[str]], Field(min_length=1, max_length=5)]
    expected_codes: NonNegativeInt | None
    events: Annotated[list[EventSource], Field(min_length=1)]


class IntentOutcome(StrEnum):
    """How an intent ended."""

    RECORDED = "recorded"  # its task(s) are in the ledger: its events are done
    REJECTED = "rejected"  # the API refused it: its events are dead letters


class IntentClosure(_Record):
    """How an intent ended; written with the intent's tombstone right after it, in the
    transaction that records its task or its dead letters."""

    model_config = ConfigDict(
        title="SCM upload intent closed",
        json_schema_extra={
            "$comment": "Generated from service.core.records.IntentClosure; do not edit."
        },
    )

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["intent_closed"] = "intent_closed"
    batch_id: Annotated[str, Field(min_length=1)]
    outcome: IntentOutcome
    task_ids: list[str] = Field(default_factory=list)


class TaskState(StrEnum):
    """The final states of a Scantrust SCM task."""

    COMPLETE = "complete"
    FAILED = "failed"


class TaskOutcome(_Record):
    """What happened to one server task: one record per task on `scm.results`."""

    model_config = ConfigDict(
        title="SCM task result",
        json_schema_extra={
            "$comment": "Generated from service.core.records.TaskOutcome; do not edit."
        },
    )

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["result"] = Field(
        default="result", description="'result': the one final record of a task."
    )
    task_id: Annotated[str, Field(min_length=1)]
    state: TaskState
    codes_affected: NonNegativeInt | None = Field(
        description="As reported by the API; null when the API reported none."
    )
    expected_codes: NonNegativeInt | None = Field(
        description="How many codes the carried events should have touched; null if unknown."
    )
    shortfall: NonNegativeInt | None = Field(
        description="expected_codes - codes_affected when positive, else 0; null if unknown."
    )
    short: bool = Field(description="True when shortfall > 0.")
    excess: NonNegativeInt | None = Field(
        default=None,
        description="codes_affected - expected_codes when positive, else 0; null if unknown.",
    )
    over: bool = Field(
        default=False,
        description="True when excess > 0: the task touched more codes than its events named.",
    )
    api_details: dict[str, Any] | None = Field(
        default=None,
        description="For a failed task: what the API's task view says beyond the states and "
        "times (its details and any error fields), bounded; null otherwise or when the view "
        "could not be read.",
    )
    campaign: int | None
    reference: str
    scm_data: dict[str, str]
    constraints: dict[str, list[str]]
    events: list[EventSource]
    submitted_at: AwareDatetime
    created_at: AwareDatetime | None = Field(description="The API's created_at.")
    started_at: AwareDatetime | None = Field(description="The API's started_at.")
    completed_at: AwareDatetime | None = Field(description="The API's completed_at.")
    published_at: AwareDatetime


class TaskProgress(_Record):
    """A task still unfinished past the stuck deadline, on `scm.results` (kind `progress`).

    Not a result: the task is still followed, and its one result comes later.
    """

    model_config = ConfigDict(
        title="SCM task progress",
        json_schema_extra={
            "$comment": "Generated from service.core.records.TaskProgress; do not edit."
        },
    )

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["progress"] = "progress"
    task_id: Annotated[str, Field(min_length=1)]
    state: Literal["pending", "in-progress", "unknown"]
    stuck: bool
    age_seconds: float
    campaign: int | None
    reference: str
    events: list[EventSource]
    submitted_at: AwareDatetime
    reported_at: AwareDatetime


# Dead-letter headers: names are part of the contract (docs/design.md 2.3).
HEADER_STAGE: Final = "scm_relay.error.stage"
HEADER_REASON: Final = "scm_relay.error.reason"
HEADER_MESSAGE: Final = "scm_relay.error.message"
HEADER_FIELD: Final = "scm_relay.error.field"
HEADER_SOURCE_TOPIC: Final = "scm_relay.source.topic"
HEADER_SOURCE_PARTITION: Final = "scm_relay.source.partition"
HEADER_SOURCE_OFFSET: Final = "scm_relay.source.offset"
HEADER_API_STATUS: Final = "scm_relay.error.api_status"
HEADER_API_BODY: Final = "scm_relay.error.api_body"
HEADER_SOURCE_SIZE: Final = "scm_relay.source.size"
HEADER_VALUE_TRUNCATED: Final = "scm_relay.value.truncated"
# A dead letter's value is the original bytes, unless they are larger than this: then
# it is their first DEAD_LETTER_PREFIX_BYTES, and the headers say so and give the size
# (the whole record stays on the input topic at its coordinates). Kafka refuses records
# over the producer's max.request.size and the topic's max.message.bytes (1 MiB by
# default): one such record would stop the relay at every start.
DEAD_LETTER_MAX_VALUE_BYTES: Final = 512 * 1024
DEAD_LETTER_PREFIX_BYTES: Final = 64 * 1024
MAX_MESSAGE_BYTES: Final = 1024
MAX_API_BODY_BYTES: Final = 4096
_TRUNCATED: Final = " [truncated]"


def truncate_utf8(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes, on a character boundary, marked if cut."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    room = max_bytes - len(_TRUNCATED)
    return encoded[:room].decode("utf-8", errors="ignore") + _TRUNCATED


class DeadLetterHeaders(_Record):
    """The headers of a dead letter; its value is the original record bytes, unchanged."""

    stage: Stage
    reason: Reason
    message: str
    source_topic: str
    source_partition: NonNegativeInt
    source_offset: NonNegativeInt
    # The field the rule concerns (`scm_data.lot`), when the contract named one.
    field: str | None = None
    api_status: int | None = None
    api_body: str | None = None
    source_size: NonNegativeInt | None = None
    value_truncated: bool = False

    @field_validator("message")
    @classmethod
    def _bound_message(cls, value: str) -> str:
        return truncate_utf8(value, MAX_MESSAGE_BYTES)

    @field_validator("api_body")
    @classmethod
    def _bound_body(cls, value: str | None) -> str | None:
        return None if value is None else truncate_utf8(value, MAX_API_BODY_BYTES)

    def to_kafka(self) -> list[tuple[str, bytes]]:
        """Kafka record headers, values UTF-8 encoded."""
        headers = [
            (HEADER_STAGE, self.stage.value),
            (HEADER_REASON, self.reason.value),
            (HEADER_MESSAGE, self.message),
            (HEADER_SOURCE_TOPIC, self.source_topic),
            (HEADER_SOURCE_PARTITION, str(self.source_partition)),
            (HEADER_SOURCE_OFFSET, str(self.source_offset)),
        ]
        if self.field is not None:
            headers.append((HEADER_FIELD, self.field))
        if self.api_status is not None:
            headers.append((HEADER_API_STATUS, str(self.api_status)))
        if self.api_body is not None:
            headers.append((HEADER_API_BODY, self.api_body))
        if self.source_size is not None:
            headers.append((HEADER_SOURCE_SIZE, str(self.source_size)))
        if self.value_truncated:
            headers.append((HEADER_VALUE_TRUNCATED, "true"))
        return [(name, value.encode("utf-8")) for name, value in headers]

    def bounded_value(
        self,
        raw: bytes,
        max_bytes: int = DEAD_LETTER_MAX_VALUE_BYTES,
        prefix_bytes: int = DEAD_LETTER_PREFIX_BYTES,
    ) -> tuple[bytes, DeadLetterHeaders]:
        """The value to write for `raw` and the headers to write it with: `raw` itself,
        or its first `prefix_bytes` when it is over `max_bytes` (see
        DEAD_LETTER_MAX_VALUE_BYTES)."""
        if len(raw) <= max_bytes:
            return raw, self
        marked = self.model_copy(update={"source_size": len(raw), "value_truncated": True})
        return raw[:prefix_bytes], marked

    @classmethod
    def from_kafka(cls, headers: Iterable[tuple[str, bytes]]) -> DeadLetterHeaders:
        """Read the headers back, e.g. for a replay tool; foreign headers are ignored."""
        values = {name: value.decode("utf-8") for name, value in headers}
        api_status = values.get(HEADER_API_STATUS)
        return cls(
            stage=Stage(values[HEADER_STAGE]),
            reason=Reason(values[HEADER_REASON]),
            message=values[HEADER_MESSAGE],
            source_topic=values[HEADER_SOURCE_TOPIC],
            source_partition=int(values[HEADER_SOURCE_PARTITION]),
            source_offset=int(values[HEADER_SOURCE_OFFSET]),
            field=values.get(HEADER_FIELD),
            api_status=None if api_status is None else int(api_status),
            api_body=values.get(HEADER_API_BODY),
            source_size=int(values[HEADER_SOURCE_SIZE]) if HEADER_SOURCE_SIZE in values else None,
            value_truncated=values.get(HEADER_VALUE_TRUNCATED) == "true",
        )
