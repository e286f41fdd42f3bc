"""Why a record was refused: the stable reason codes, the stage each belongs to, and
the `Rejection` that carries a code with its message to the dead-letter headers.

Never rename a reason's value: operators filter dead letters and alert on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class Stage(StrEnum):
    """Where a record was refused; carried in `scm_relay.error.stage`."""

    DECODE = "decode"
    VALIDATE = "validate"
    API = "api"


class Reason(StrEnum):
    """Stable machine codes for refused records (`scm_relay.error.reason`).

    Never rename a member's value: operators filter dead letters and alert on them.
    """

    # decode: the bytes are not a JSON object
    NOT_UTF8 = "not_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    TOO_DEEPLY_NESTED = "too_deeply_nested"
    # validate: the object breaks a rule
    RECORD_TOO_LARGE = "record_too_large"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_FIELD = "missing_field"
    EVENT_ID_INVALID = "event_id_invalid"
    EVENT_ID_TOO_LONG = "event_id_too_long"
    EVENT_ID_CONTROL_CHARACTER = "event_id_control_character"
    CONSTRAINTS_NOT_OBJECT = "constraints_not_object"
    CONSTRAINTS_KEY_COUNT = "constraints_key_count"
    CONSTRAINT_KEY_MESSAGE = "constraint_key_message"
    CONSTRAINT_KEY_FORBIDDEN = "constraint_key_forbidden"
    CONSTRAINT_KEY_INVALID = "constraint_key_invalid"
    CONSTRAINT_VALUES_EMPTY = "constraint_values_empty"
    CONSTRAINT_VALUE_INVALID = "constraint_value_invalid"
    CONSTRAINT_VALUE_BLANK = "constraint_value_blank"
    CONSTRAINT_VALUE_TOO_LONG = "constraint_value_too_long"
    CONSTRAINT_VALUE_WHITESPACE = "constraint_value_whitespace"
    CONSTRAINT_VALUE_DUPLICATE = "constraint_value_duplicate"
    CONSTRAINT_VALUE_CONTROL_CHARACTER = "constraint_value_control_character"
    TOO_MANY_VALUES = "too_many_values"
    MULTI_KEY_TOO_MANY_VALUES = "multi_key_too_many_values"
    MULTI_KEY_TOO_MANY_BYTES = "multi_key_too_many_bytes"
    SCM_DATA_NOT_OBJECT = "scm_data_not_object"
    SCM_DATA_EMPTY = "scm_data_empty"
    SCM_DATA_TOO_MANY_KEYS = "scm_data_too_many_keys"
    SCM_DATA_KEY_IMMUTABLE = "scm_data_key_immutable"
    SCM_DATA_KEY_PRODUCT_ID = "scm_data_key_product_id"
    SCM_DATA_KEY_STATUS = "scm_data_key_status"
    SCM_DATA_KEY_INVALID = "scm_data_key_invalid"
    SCM_DATA_VALUE_INVALID = "scm_data_value_invalid"
    SCM_DATA_VALUE_TOO_LONG = "scm_data_value_too_long"
    SCM_DATA_VALUE_WHITESPACE = "scm_data_value_whitespace"
    SCM_DATA_VALUE_CONTROL_CHARACTER = "scm_data_value_control_character"
    ACTIVATION_STATUS_INVALID = "activation_status_invalid"
    BLACKLIST_REASON_INVALID = "blacklist_reason_invalid"
    CAMPAIGN_TYPE = "campaign_type"
    CAMPAIGN_NOT_POSITIVE = "campaign_not_positive"
    REFERENCE_INVALID = "reference_invalid"
    REFERENCE_TOO_LONG = "reference_too_long"
    REFERENCE_CONTROL_CHARACTER = "reference_control_character"
    EXPECTED_CODES_INVALID = "expected_codes_invalid"
    DUPLICATE_KEY = "duplicate_key"
    # api: the API refused the batch the event was in
    API_REJECTED = "api_rejected"

    @property
    def stage(self) -> Stage:
        """The stage this reason belongs to."""
        if self in _DECODE_REASONS:
            return Stage.DECODE
        if self is Reason.API_REJECTED:
            return Stage.API
        return Stage.VALIDATE


_DECODE_REASONS: Final = frozenset(
    {Reason.NOT_UTF8, Reason.INVALID_JSON, Reason.NOT_AN_OBJECT, Reason.TOO_DEEPLY_NESTED}
)


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record was refused: what the dead-letter headers and `validate` report."""

    reason: Reason
    message: str
    field: str | None = None
    further_problems: int = 0

    @property
    def stage(self) -> Stage:
        """The stage of `reason`."""
        return self.reason.stage
