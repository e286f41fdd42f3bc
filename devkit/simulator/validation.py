"""An upload body judged as the vendor's API judges it (docs/scantrust-scm-api.md): a
new pending task, or the 400 body, field by field, in the framework's words."""

from __future__ import annotations

import unicodedata
import uuid
from typing import Any, Final

from devkit.simulator.clock import now_iso
from devkit.simulator.tasks import Task

MAX_CONSTRAINT_KEYS: Final = 5
MAX_CONSTRAINT_VALUES: Final = 1000
IDENTIFIER_FIELDS: Final = ("extended_id", "serial_number")
SPECIAL_SCM_KEYS: Final = ("product", "activation_status", "blacklist_reason")
_BLACKLIST: Final = frozenset(str(n) for n in range(11))


class UploadInvalid(Exception):
    """A 400: `errors` is the body, by field, in the vendor's shape."""

    def __init__(self, errors: dict[str, Any]) -> None:
        super().__init__(str(errors))
        self.errors = errors


class UploadRules:
    """The checks of an upload against the account's campaigns and their SCM fields."""

    def __init__(self, campaign_fields: dict[int, frozenset[str]]) -> None:
        self.campaign_fields = campaign_fields

    def validate(self, body: Any) -> Task:
        """Check an upload body as the API does; a new pending task, or `UploadInvalid`."""
        if not isinstance(body, dict):
            kind = type(body).__name__
            raise UploadInvalid(
                {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {kind}."]}
            )
        errors: dict[str, Any] = {}
        campaign = self._check_campaign(body.get("campaign"), errors)
        constraints = self._check_constraints(body.get("constraints"), campaign, errors)
        scm_data = self._check_scm_data(body.get("scm_data"), campaign, errors)
        reference = body.get("reference", "")
        if reference is None:
            reference = ""
        if not isinstance(reference, str):
            errors["reference"] = ["Not a valid string."]
        elif (problem := _not_text_problem(reference)) is not None:
            errors["reference"] = [problem]
        if errors:
            raise UploadInvalid(errors)
        if constraints is None or scm_data is None:  # pragma: no cover - errors said so
            raise UploadInvalid({"non_field_errors": ["Invalid data."]})
        return Task(
            id=str(uuid.uuid4()),
            reference=reference,
            constraints=constraints,
            scm_data=scm_data,
            campaign=campaign,
            created_at=now_iso(),
        )

    def _check_campaign(self, campaign: Any, errors: dict[str, Any]) -> int | None:
        if campaign is None:
            return None
        if not isinstance(campaign, int) or isinstance(campaign, bool):
            kind = "str" if isinstance(campaign, str) else type(campaign).__name__
            errors["campaign"] = [f"Incorrect type. Expected pk value, received {kind}."]
            return None
        if campaign not in self.campaign_fields:
            errors["campaign"] = [f'Invalid pk "{campaign}" - object does not exist.']
            return None
        return campaign

    def _check_constraints(
        self, constraints: Any, campaign: int | None, errors: dict[str, Any]
    ) -> dict[str, list[str]] | None:
        problem = _object_problem(constraints, "At least one constraint is required.")
        if problem is not None:
            errors["constraints"] = [problem]
            return None
        if len(constraints) > MAX_CONSTRAINT_KEYS:
            errors["constraints"] = [f"At most {MAX_CONSTRAINT_KEYS} constraints are allowed."]
            return None
        by_key: dict[str, str] = {}
        normalised: dict[str, list[str]] = {}
        total = 0
        for key, raw in constraints.items():
            problem = _not_text_problem(key) or self._constraint_key_problem(key, campaign)
            values = raw if isinstance(raw, list) else [raw]
            total += len(values)
            if problem is None:
                problem = _values_problem(values)
            if problem is not None:
                by_key[key] = problem
            else:
                normalised[key] = list(values)
        if total > MAX_CONSTRAINT_VALUES:
            errors["constraints"] = [f"At most {MAX_CONSTRAINT_VALUES} values are allowed."]
            return None
        if by_key:
            errors["constraints"] = by_key
            return None
        return normalised

    def _constraint_key_problem(self, key: str, campaign: int | None) -> str | None:
        if key == "message":
            return "Invalid constraint name, please use 'extended_id' instead"
        if key in ("product", "product_id", "campaign", "campaign_id"):
            return "Invalid constraint name"
        if (
            campaign is not None
            and key not in IDENTIFIER_FIELDS
            and key not in self.campaign_fields[campaign]
        ):
            return f"Invalid constraint name, '{key}' is not a field of campaign {campaign}"
        return None

    def _check_scm_data(
        self, scm_data: Any, campaign: int | None, errors: dict[str, Any]
    ) -> dict[str, str] | None:
        problem = _object_problem(scm_data, "At least one field is required.")
        if problem is not None:
            errors["scm_data"] = [problem]
            return None
        by_key: dict[str, str] = {}
        for key, value in scm_data.items():
            problem = _not_text_problem(key) or _scm_key_problem(key)
            if (
                problem is None
                and campaign is not None
                and key not in SPECIAL_SCM_KEYS
                and key not in self.campaign_fields[campaign]
            ):
                # The vendor: with `campaign` given, "the server checks that
                # client_custom_field is a field of campaign 11" (the wording is ours).
                problem = f"Invalid key name, '{key}' is not a field of campaign {campaign}"
            if problem is None and not isinstance(value, str):
                problem = "Values must be strings."
            if problem is None:
                problem = _not_text_problem(value)
            if problem is None and key == "activation_status" and value not in ("0", "1", "2"):
                problem = "Invalid value, use 0 (inactive), 1 (active) or 2 (blacklisted)"
            if problem is None and key == "blacklist_reason" and value not in _BLACKLIST:
                problem = "Invalid value, use 0 to 10"
            if problem is not None:
                by_key[key] = problem
        if by_key:
            errors["scm_data"] = by_key
            return None
        return dict(scm_data)


def _object_problem(value: Any, when_empty: str) -> str | None:
    """What is wrong with a required JSON-object field, in the framework's words."""
    if value is None:
        return "This field is required."
    if not isinstance(value, dict):
        return f'Expected a dictionary of items but got type "{type(value).__name__}".'
    if not value:
        return when_empty
    return None


def _values_problem(values: list[Any]) -> str | None:
    if not values:
        return "At least one value is required."
    if not all(isinstance(value, str) for value in values):
        return "Values must be strings."
    for value in values:
        if (problem := _not_text_problem(value)) is not None:
            return problem
    if any(not value.strip() for value in values):
        return "Blank values are not allowed."
    if len(set(values)) != len(values):
        return "Duplicate values are not allowed."
    return None


# Control (Cc: NUL, ESC, line breaks), format (Cf: zero-width space, bidi overrides) and
# lone surrogates (Cs): the vendor says nothing of them, so the simulator refuses them.
_NOT_TEXT: Final = frozenset({"Cc", "Cf", "Cs"})


def _not_text_problem(text: str) -> str | None:
    """Why `text` holds a character that is not text (the first one), or None."""
    if text.isprintable():  # then none of them (the common case, checked in C)
        return None
    # isprintable() also refuses what is text here (no-break space, Zl, Zp, Co, Cn).
    for position, char in enumerate(text):
        if unicodedata.category(char) in _NOT_TEXT:
            return (
                f"Control and format characters are not allowed: U+{ord(char):04X} "
                f"({unicodedata.category(char)}) at position {position}."
            )
    return None


def _scm_key_problem(key: str) -> str | None:
    if key in ("extended_id", "serial_number", "message"):
        return "Invalid key name"
    if key == "product_id":
        return "Invalid key name, use 'product' instead"
    if key == "status":
        return "Invalid key name, use 'activation_status' instead"
    return None
