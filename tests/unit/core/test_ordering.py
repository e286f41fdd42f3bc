"""Guarantee 4 in the pure core: later changes to a code wait for earlier ones."""

from __future__ import annotations

from service.core.ordering import Change, OrderGuard


def change(market: str, *values: str, key: str = "extended_id") -> Change:
    return Change({key: values or ("c1",)}, {"intended_market": market})


def test_a_different_value_for_a_claimed_field_conflicts_the_same_value_does_not() -> None:
    guard: OrderGuard[str] = OrderGuard()
    guard.claim("batch-1", change("A"))
    assert guard.conflicts(change("B"))
    assert not guard.conflicts(change("A"))
    assert not guard.conflicts(change("B", "c2"))
    assert not guard.conflicts(Change({"extended_id": ("c1",)}, {"lot": "7"}))
    assert not guard.conflicts(change("B", key="serial_number"))


def test_a_b_a_is_released_in_order() -> None:
    guard: OrderGuard[str] = OrderGuard()
    guard.claim("task-A", change("A"))
    assert guard.conflicts(change("B"))
    guard.hold("B", change("B"))
    # The second A writes what task-A writes, but must not overtake the held B.
    assert guard.conflicts(change("A"))
    guard.hold("A2", change("A"))
    assert guard.next_admissible() is None
    guard.release("task-A")
    assert guard.next_admissible() == "B"
    guard.claim("task-B", change("B"))
    assert guard.next_admissible() is None  # A2 conflicts with the B now claimed
    guard.release("task-B")
    assert guard.next_admissible() == "A2"
    assert guard.held == 0


def test_unrelated_held_events_pass_blocked_ones() -> None:
    guard: OrderGuard[str] = OrderGuard()
    guard.claim("t1", change("A", "c1"))
    guard.hold("blocked", change("B", "c1"))
    guard.claim("t2", change("A", "c2"))
    guard.hold("other", change("B", "c2"))
    guard.release("t2")
    assert guard.next_admissible() == "other"
    assert guard.next_admissible() is None


def test_claims_are_idempotent_and_released_per_owner() -> None:
    guard: OrderGuard[str] = OrderGuard()
    guard.claim("t1", change("A", "c1", "c2"))
    guard.claim("t1", change("A", "c1", "c2"))
    guard.claim("t2", change("A", "c1"))
    assert guard.claimed_codes == 2
    guard.release("t1")
    assert guard.conflicts(change("B", "c1"))  # t2 still writes A to c1
    assert not guard.conflicts(change("B", "c2"))
    guard.release("t2")
    assert guard.claimed_codes == 0
    assert not guard.owns("t2")


def test_drop_held_returns_everything() -> None:
    guard: OrderGuard[str] = OrderGuard()
    guard.claim("t", change("A"))
    guard.hold("x", change("B"))
    assert guard.drop_held() == ["x"]
    assert not guard.conflicts(change("A", "c9"))
    assert guard.held == 0


def test_a_change_with_several_keys_claims_and_checks_every_key() -> None:
    guard: OrderGuard[str] = OrderGuard()
    both = Change({"extended_id": ("c1",), "rfid": ("r1", "r2")}, {"intended_market": "A"})
    guard.claim("multi", both)
    assert guard.claimed_codes == 3
    # A later change to any of its codes, under any of its keys, waits behind it.
    assert guard.conflicts(change("B", "c1"))
    assert guard.conflicts(change("B", "r2", key="rfid"))
    assert not guard.conflicts(change("B", "c2"))
    # ... and a change with several keys waits behind an earlier change to any one.
    guard.release("multi")
    guard.claim("single", change("A", "r2", key="rfid"))
    later = Change({"extended_id": ("c9",), "rfid": ("r2",)}, {"intended_market": "B"})
    assert guard.conflicts(later)
    guard.hold("later", later)
    assert guard.conflicts(change("C", "c9")), "a held change's other key let a later pass"
    guard.release("single")
    assert guard.next_admissible() == "later"
