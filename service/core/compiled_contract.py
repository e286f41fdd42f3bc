"""The change-event contract compiled into one pydantic-core validator.

`ChangeEvent`'s own validation runs a Python function per field and per value,
because each refusal needs its reason code, field and fix: about 10 µs an event.
Most events are valid, and for them that work proves nothing new. The schema
built here checks the same rules in pydantic-core's compiled code (strict types,
lengths, Rust regular expressions) and builds the `ChangeEvent` directly from
the record's bytes: about 2.5 µs, as fast as `json.loads`.

It is only ever a shortcut: it accepts a subset of what the contract accepts,
with exactly the contract's result, and anything it does not accept (an int
constraint value, a float in scm_data, any mistake) is judged again by
`ChangeEvent`'s validators, which give the reason. `parsing.parse_event` runs
the few checks a schema cannot express (forbidden keys, duplicate values, the
request bounds of an event with several constraint keys, warnings) on what this
returns. `tests/unit/core/test_compiled_contract.py` holds the
two to the same verdicts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from pydantic import BaseModel
from pydantic_core import SchemaValidator, core_schema

from service.core.control_chars import RUST_CLASS_BODY

if TYPE_CHECKING:
    from service.core.contract_limits import ContractLimits

# Neither white space nor a control or format character (service/core/control_chars.py):
# what a value may start and end with. Python's str.strip() removes what str.isspace()
# calls white space: Unicode's White_Space (the regex crate's \s) plus the four
# separators U+001C..U+001F, which are control characters (Cc) and so in the class.
NOT_SPACE_OR_CONTROL: Final = rf"[^\s{RUST_CLASS_BODY}]"
# Anything but a control or format character: what a value may hold inside.
NOT_CONTROL: Final = rf"[^{RUST_CLASS_BODY}]"
# A value with neither white space at either end nor a control character (and at least
# one character).
NO_SPACE_AROUND: Final = rf"^{NOT_SPACE_OR_CONTROL}(?:{NOT_CONTROL}*{NOT_SPACE_OR_CONTROL})?$"
# The same, or empty (an scm_data value may be empty: it clears the field).
EMPTY_OR_NO_SPACE_AROUND: Final = (
    rf"^(?:{NOT_SPACE_OR_CONTROL}(?:{NOT_CONTROL}*{NOT_SPACE_OR_CONTROL})?)?$"
)
# Not blank, no control character anywhere (an event id).
NOT_BLANK: Final = rf"^{NOT_CONTROL}*{NOT_SPACE_OR_CONTROL}{NOT_CONTROL}*$"
# No control character, empty allowed (a reference).
NO_CONTROL: Final = rf"^{NOT_CONTROL}*$"


def compile_contract(
    model: type[BaseModel], limits: ContractLimits, key_pattern: str, max_keys: int
) -> SchemaValidator:
    """A validator of JSON bytes that builds `model` instances for events it is sure of.

    Constraints have one to `max_keys` keys, each with one string or a list of strings
    (a lone string stays a string: the caller wraps it); scm_data values are strings.
    Numbers are left to the contract's own validators, which render them as the API is
    sent them.
    """

    def text(pattern: str | None = None, max_length: int | None = None) -> core_schema.CoreSchema:
        return core_schema.str_schema(pattern=pattern, max_length=max_length, strict=True)

    def optional(schema: core_schema.CoreSchema) -> core_schema.CoreSchema:
        return core_schema.with_default_schema(core_schema.nullable_schema(schema), default=None)

    key = text(key_pattern, limits.max_key_length)
    value = text(NO_SPACE_AROUND, limits.max_value_length)
    values = core_schema.union_schema(
        [
            core_schema.tuple_schema(
                [value],
                variadic_item_index=0,
                min_length=1,
                max_length=limits.max_values_per_event,
                strict=True,
            ),
            value,
        ],
        mode="left_to_right",
    )
    fields = {
        "event_id": optional(text(NOT_BLANK, limits.max_event_id_length)),
        "constraints": core_schema.dict_schema(
            key, values, min_length=1, max_length=max_keys, strict=True
        ),
        "scm_data": core_schema.dict_schema(
            key,
            text(EMPTY_OR_NO_SPACE_AROUND, limits.max_value_length),
            min_length=1,
            max_length=limits.max_scm_data_keys,
            strict=True,
        ),
        "campaign": optional(core_schema.int_schema(ge=1, strict=True)),
        "reference": optional(text(NO_CONTROL, limits.max_reference_length)),
        "expected_codes": optional(core_schema.int_schema(ge=0, strict=True)),
    }
    schema = core_schema.model_schema(
        model,
        core_schema.model_fields_schema(
            {name: core_schema.model_field(field) for name, field in fields.items()},
            extra_behavior="forbid",
        ),
        frozen=True,
        strict=True,
    )
    # pydantic-core reuses a finished model's own validator for a model schema of that
    # class (its "prebuilt" shortcut), which would quietly bring back the per-field
    # Python validators; the model reads as unfinished only while this one is built.
    # Should that rule change, the result is still correct, only slower, and
    # test_compiled_contract.py fails on it.
    finished = model.__dict__.get("__pydantic_complete__", False)
    type.__setattr__(model, "__pydantic_complete__", False)
    try:
        # Codes are unique: only keys repeat, so only keys are worth pydantic-core's
        # string cache (about 5 % faster than caching every short string).
        return SchemaValidator(schema, core_schema.CoreConfig(cache_strings="keys"))
    finally:
        type.__setattr__(model, "__pydantic_complete__", finished)
