"""The account's codes and campaigns: what a task's constraints select and what its
scm_data writes to them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from devkit.simulator.clock import now_iso
from devkit.simulator.seed import Seed


@dataclass
class Code:
    """One code of the account and what was written to it."""

    extended_id: str
    serial_number: str | None
    campaign: int
    product: str | None
    scm_data: dict[str, str]
    activation_status: str = "1"
    blacklist_reason: str = "0"
    history: list[dict[str, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """The inspection view of `/_sim/codes`."""
        return {
            "extended_id": self.extended_id,
            "serial_number": self.serial_number,
            "campaign": self.campaign,
            "product": self.product,
            "activation_status": self.activation_status,
            "blacklist_reason": self.blacklist_reason,
            "scm_data": dict(self.scm_data),
            "history": list(self.history),
        }


class CodeStore:
    """The seeded codes, indexed by every value that can select them, and the SCM
    fields each campaign defines."""

    def __init__(self, seed: Seed) -> None:
        self.campaign_fields = {c.id: frozenset(c.scm_fields) for c in seed.campaigns}
        self.codes: list[Code] = []
        # field -> value -> indexes of codes holding it; identifiers and SCM fields alike.
        self._index: dict[str, dict[str, set[int]]] = {}
        self._apply_sequence = 0
        for seeded in seed.codes:
            self._add_code(
                Code(
                    extended_id=seeded.extended_id,
                    serial_number=seeded.serial_number,
                    campaign=seeded.campaign,
                    product=seeded.product,
                    scm_data=dict(seeded.scm_data),
                )
            )

    def _add_code(self, code: Code) -> None:
        position = len(self.codes)
        self.codes.append(code)
        self._index_value("extended_id", code.extended_id, position)
        if code.serial_number is not None:
            self._index_value("serial_number", code.serial_number, position)
        for key, value in code.scm_data.items():
            self._index_value(key, value, position)

    def _index_value(self, key: str, value: str, position: int) -> None:
        self._index.setdefault(key, {}).setdefault(value, set()).add(position)

    def _unindex_value(self, key: str, value: str, position: int) -> None:
        self._index.get(key, {}).get(value, set()).discard(position)

    def find_code(self, key: str, value: str) -> Code | None:
        """The first code whose `key` is `value` (inspection)."""
        positions = self._index.get(key, {}).get(value)
        return self.codes[min(positions)] if positions else None

    def matching(self, constraints: dict[str, list[str]]) -> set[int]:
        """Codes matched by any constraint value (several keys combine as a union)."""
        matched: set[int] = set()
        for key, values in constraints.items():
            by_value = self._index.get(key, {})
            for value in values:
                matched |= by_value.get(value, set())
        return matched

    def apply(
        self, task_id: str, constraints: dict[str, list[str]], scm_data: dict[str, str]
    ) -> int:
        """Write `scm_data` to the codes `constraints` select, in code order, each change
        noted in the code's history under one sequence number; the codes changed."""
        affected = 0
        self._apply_sequence += 1
        for position in sorted(self.matching(constraints)):
            if self._apply(position, task_id, scm_data):
                affected += 1
        return affected

    def _apply(self, position: int, task_id: str, scm_data: dict[str, str]) -> bool:
        code = self.codes[position]
        allowed = self.campaign_fields[code.campaign]
        changes: dict[str, str] = {}
        for key, value in scm_data.items():
            if key == "product":
                code.product = value
            elif key == "activation_status":
                code.activation_status = value
            elif key == "blacklist_reason":
                code.blacklist_reason = value
            elif key in allowed:
                old = code.scm_data.get(key)
                if old is not None:
                    self._unindex_value(key, old, position)
                code.scm_data[key] = value
                self._index_value(key, value, position)
            else:
                continue  # not a field of the code's campaign: discarded, as the vendor does
            changes[key] = value
        if not changes:
            return False
        code.history.append(
            {"task_id": task_id, "sequence": self._apply_sequence, "at": now_iso(), "set": changes}
        )
        return True
