"""docs/settings.md, generated from the sections of the Settings class (`make settings-doc`).

Every row comes from a field: its environment variable, its default and its
description, so the reference cannot drift from the code (a test compares).
Run `python -m devkit.settings_reference > docs/settings.md` to regenerate.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from pydantic.fields import FieldInfo

from service.settings import Settings, env_name, setting_fields

# The title and introduction of each section of `Settings`, in the order it declares them.
SECTIONS: Final[dict[str, tuple[str, str]]] = {
    "kafka": ("Kafka", ""),
    "api": ("Scantrust API", ""),
    "batching": ("Batching", ""),
    "tracking": ("Task tracking", ""),
    "limits": (
        "Event contract limits",
        "See docs/event-contract.md. An event over a limit goes to the dead-letter topic "
        "with the reason in brackets.\n\n",
    ),
    "operations": ("Operations", ""),
}

HEADER: Final = """\
# Settings reference

<!-- Generated from service/settings.py by `make settings-doc` (the event contract
limits from service/core/contract_limits.py); edit the field descriptions there,
not this file. A test fails when the two differ. -->

Every setting is an environment variable with the prefix `SCM_RELAY_`, or a
key (lower case, without the prefix) in the TOML file named by
`SCM_RELAY_CONFIG`; the environment wins over the file, the file over the
defaults. A bad value stops the service at start with the setting's name and
why, e.g. `SCM_RELAY_BATCH_MAX_VALUES: Input should be less than or equal to 1000 (got '5000')`.
Unknown keys in the TOML file are refused.

```toml
# relay.toml, used with SCM_RELAY_CONFIG=relay.toml
kafka_bootstrap_servers = "kafka-1:9092,kafka-2:9092"
batch_linger_ms = 500
one_code_per_value_keys = ["rfid", "case_id"]
```
"""

# Variables of the tooling, not the service: listed so nobody mistakes them for settings.
TOOLING: Final[dict[str, str]] = {
    "SCM_RELAY_CONFIG": "the path of the TOML settings file above",
    "SCM_RELAY_TEST_KAFKA": "the tests: run against this broker instead of starting one",
    "SCM_RELAY_KAFKA_PORT": "`deploy/local-kafka/kafka-local`",
    "SCM_RELAY_KAFKA_HEAP": "`deploy/local-kafka/kafka-local`",
    "SCM_RELAY_KAFKA_VERSION": "`deploy/local-kafka/kafka-local`",
    "SCM_RELAY_KAFKA_RUN_DIR": "`deploy/local-kafka/kafka-local`",
    "SCM_RELAY_KAFKA_START_TIMEOUT": "`deploy/local-kafka/kafka-local`",
    "SCM_RELAY_KAFKA_SECURE_DIR": "`deploy/local-kafka/kafka-local` (the security tests)",
}


def default_text(field: FieldInfo) -> str:
    """The default as a reader would type it in the environment."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "default_doc" in extra:
        return str(extra["default_doc"])
    value: Any = field.default
    if value is None:
        return "unset"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, frozenset | set | list | tuple):
        value = ",".join(sorted(map(str, value)))
    return f"`{value}`"


def _rows() -> Iterator[str]:
    current = None
    for section, attribute, name, field in setting_fields():
        if section != current:
            current = section
            title, intro = SECTIONS[section]
            yield f"\n## {title}\n\n{intro}| variable | default | meaning |\n|---|---|---|\n"
        if not field.description:
            raise ValueError(f"Settings.{section}.{attribute} has no description for docs")
        yield f"| `{env_name(name)}` | {default_text(field)} | {field.description} |\n"


def render() -> str:
    """The whole of docs/settings.md."""
    untitled = set(Settings.model_fields) - set(SECTIONS)
    if untitled:
        raise ValueError(f"sections without a title in SECTIONS: {sorted(untitled)}")
    tooling = "".join(f"| `{name}` | {use} |\n" for name, use in TOOLING.items())
    return (
        HEADER
        + "".join(_rows())
        + "\n## Not settings\n\nThese variables belong to the tooling, not to the service:\n\n"
        + "| variable | used by |\n|---|---|\n"
        + tooling
    )


if __name__ == "__main__":
    print(render(), end="")
