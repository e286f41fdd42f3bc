"""The change event upstream publishes (docs/design.md section 2.1): its model, whose
fields are judged by the vendor's rules (rules.py), and the JSON Schema of each field
(schemas/scm-change-event.schema.json is generated from them).

`parsing.parse_event` turns a record's bytes into this model or a `Rejection`.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
)

from service.core.contract_limits import DEFAULT_LIMITS
from service.core.control_chars import SCHEMA_CLASS
from service.core.rules import (
    KEY_PATTERN,
    MAX_CONSTRAINT_KEYS,
    NOT_AN_SCM_KEY,
    check_campaign,
    check_constraints,
    check_event_id,
    check_expected_codes,
    check_reference,
    check_scm_data,
)

# JSON Schemas of the accepted input (the field validators of rules.py are plain
# functions, so pydantic cannot derive them). They use the default limits.
# Values are sent as published, so white space around one is refused: a constraint
# value has something else in it; an scm_data value may be empty.
NO_SURROUNDING_SPACE: Final = r"^\S(?:[\s\S]*\S)?$"
NO_SPACE_AROUND: Final = r"^(?:\S(?:[\s\S]*\S)?)?$"
# No string holds a control or format character (service/core/control_chars.py). Said as
# "does not contain one" rather than an anchored "[^...]*$": in Python's `re` (the
# `jsonschema` library) `$` also matches before a final line break, so the anchored form
# would pass "a\n". The `type` keeps the rule off the null of optional fields.
# (devkit/schemas.py writes it once, under $defs, and refers to it.)
CONTROL_CHARACTER_SCHEMA: Final = {"type": "string", "pattern": SCHEMA_CLASS}
_NO_CONTROL: Final = {"not": CONTROL_CHARACTER_SCHEMA}
_KEY_SCHEMA: Final = {
    "type": "string",
    "pattern": KEY_PATTERN,
    "maxLength": DEFAULT_LIMITS.max_key_length,
    **_NO_CONTROL,
}
_CONSTRAINT_VALUE_SCHEMA: Final = {
    "oneOf": [
        {
            "type": "string",
            "pattern": NO_SURROUNDING_SPACE,
            "maxLength": DEFAULT_LIMITS.max_value_length,
            **_NO_CONTROL,
        },
        {"type": "integer"},
    ]
}
_CONSTRAINTS_SCHEMA: Final = {
    "type": "object",
    "description": (
        "Selects the codes to change: one to five keys (extended_id, serial_number or an "
        "SCM field key such as rfid), each with one value or a list of distinct values. "
        "Values are matched exactly (case sensitive) and hold no control or format "
        "character (Unicode Cc, Cf). An event with several keys is sent as a request of "
        "its own, so its values must fit one request (1000 values by default)."
    ),
    "minProperties": 1,
    "maxProperties": MAX_CONSTRAINT_KEYS,
    "propertyNames": {
        "allOf": [
            _KEY_SCHEMA,
            {"not": {"enum": ["message", "product", "product_id", "campaign", "campaign_id"]}},
        ]
    },
    "additionalProperties": {
        "oneOf": [
            _CONSTRAINT_VALUE_SCHEMA,
            {
                "type": "array",
                "items": _CONSTRAINT_VALUE_SCHEMA,
                "minItems": 1,
                "maxItems": DEFAULT_LIMITS.max_values_per_event,
                "uniqueItems": True,
            },
        ]
    },
    "examples": [
        {"extended_id": ["0A70X1", "0A70X2"]},
        {"rfid": "E2801160600002"},
        {"serial_number": ["SN-1", "SN-2"], "lot_case_id": "C-7"},
    ],
}
_SCM_VALUE_SCHEMA: Final = {
    "oneOf": [
        {
            "type": "string",
            "pattern": NO_SPACE_AROUND,
            "maxLength": DEFAULT_LIMITS.max_value_length,
            **_NO_CONTROL,
        },
        {"type": "number"},
    ],
}
_SCM_DATA_SCHEMA: Final = {
    "type": "object",
    "description": (
        "The SCM fields to write on every selected code. Values are sent as strings. "
        "Keys named 'date' or ending in '_date' should hold YYYY-MM-DD dates."
    ),
    "minProperties": 1,
    "maxProperties": DEFAULT_LIMITS.max_scm_data_keys,
    "propertyNames": {
        "allOf": [
            _KEY_SCHEMA,
            {"not": {"enum": sorted(NOT_AN_SCM_KEY)}},
        ]
    },
    "properties": {
        "activation_status": {
            "description": "0 inactive, 1 active, 2 blacklisted",
            "oneOf": [
                {"type": "integer", "enum": [0, 1, 2]},
                {"type": "string", "pattern": r"^[0-2]$", **_NO_CONTROL},
            ],
        },
        "blacklist_reason": {
            "description": "0 to 10, see docs/event-contract.md",
            "oneOf": [
                {"type": "integer", "minimum": 0, "maximum": 10},
                {"type": "string", "pattern": r"^([0-9]|10)$", **_NO_CONTROL},
            ],
        },
    },
    "additionalProperties": _SCM_VALUE_SCHEMA,
    "examples": [{"production_date": "2026-11-27", "intended_market": "DE"}],
}


def _constraints_as_lists(value: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    return {key: list(values) for key, values in value.items()}


Constraints = Annotated[
    dict[str, tuple[str, ...]],
    PlainValidator(check_constraints),
    PlainSerializer(_constraints_as_lists),
    WithJsonSchema(_CONSTRAINTS_SCHEMA),
]
ScmData = Annotated[
    dict[str, str], PlainValidator(check_scm_data), WithJsonSchema(_SCM_DATA_SCHEMA)
]
EventId = Annotated[
    str | None,
    PlainValidator(check_event_id),
    WithJsonSchema(
        {
            "type": ["string", "null"],
            "pattern": r"\S",
            "maxLength": DEFAULT_LIMITS.max_event_id_length,
            **_NO_CONTROL,
            "description": "The publisher's id of this event; carried into results and logs.",
        }
    ),
]
Campaign = Annotated[
    int | None,
    PlainValidator(check_campaign),
    WithJsonSchema(
        {"type": ["integer", "null"], "minimum": 1, "description": "Scantrust campaign id."}
    ),
]
Reference = Annotated[
    str | None,
    PlainValidator(check_reference),
    WithJsonSchema(
        {
            "type": ["string", "null"],
            "maxLength": DEFAULT_LIMITS.max_reference_length,
            **_NO_CONTROL,
            "description": "Human-readable name; tasks can be grouped by it at the API.",
        }
    ),
]
ExpectedCodes = Annotated[
    int | None,
    PlainValidator(check_expected_codes),
    WithJsonSchema(
        {
            "type": ["integer", "null"],
            "minimum": 0,
            "description": "How many codes this event should touch.",
        }
    ),
]


class ChangeEvent(BaseModel):
    """One SCM change published by an upstream system (docs/design.md section 2.1)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="SCM change event",
        json_schema_extra={
            "$comment": "Generated from service.core.contract.ChangeEvent; do not edit.",
        },
    )

    event_id: EventId = Field(default=None)
    constraints: Constraints
    scm_data: ScmData
    campaign: Campaign = Field(default=None)
    reference: Reference = Field(default=None)
    expected_codes: ExpectedCodes = Field(default=None)

    # `constraints`: each key (`extended_id`, `serial_number` or an SCM field) with its
    # values, normalised, in the order given, without duplicates. One key for most events;
    # an event with several is sent as a request of its own (docs/design.md section 4).

    @property
    def value_count(self) -> int:
        """The constraint values of all keys."""
        return sum(len(values) for values in self.constraints.values())
