"""Admission's decisions (scheduler/admission.py): the order of waiting tasks and what fits."""

from __future__ import annotations

import collections

from hypothesis import given
from hypothesis import strategies as st

from scaleodm.common.settings import CapacitySettings, SizeClass
from scaleodm.common.store.admission import Active, Waiting
from scaleodm.scheduler.admission import admit, order

CAPACITY = CapacitySettings(max_active=4, classes=[
    SizeClass(name="small", max_images=200, slots=3),
    SizeClass(name="large", max_images=None, slots=1),
])


def task(n: int, tenant: str = "t", *, priority: int = 0, size: str = "small",
         at: int | None = None) -> Waiting:
    return Waiting(task_id=f"task-{n:04d}", attempt=1, tenant=tenant, priority=priority,
                   queued_at_ms=n if at is None else at, size_class=size)


def ids(tasks: list[Waiting]) -> list[str]:
    return [t.task_id for t in tasks]


NOTHING = Active({}, {})


def test_higher_priority_first_then_oldest() -> None:
    waiting = [task(1), task(2, priority=5), task(3), task(4, priority=5), task(5, priority=-1)]
    assert ids(order(waiting, {})) == ids([task(2), task(4), task(1), task(3), task(5)])


def test_fair_share_interleaves_tenants_whatever_one_submitted() -> None:
    """200 tasks of one tenant, then 2 each of two others: the others' tasks are in the first
    places, not behind the 200."""
    waiting = [task(n, "big") for n in range(200)]
    waiting += [task(1000 + n, "a") for n in range(2)] + [task(2000 + n, "b") for n in range(2)]
    ordered = order(waiting, {})
    first = [t.tenant for t in ordered[:6]]
    assert first == ["big", "a", "b", "big", "a", "b"]
    assert [t.tenant for t in ordered[6:]] == ["big"] * 198
    # Within a tenant, oldest first.
    big = [t.queued_at_ms for t in ordered if t.tenant == "big"]
    assert big == sorted(big)


def test_fair_share_counts_the_runs_a_tenant_has_already() -> None:
    waiting = [task(1, "busy"), task(2, "idle"), task(3, "busy"), task(4, "idle")]
    # "busy" holds 3 runs, "idle" none: both of idle's tasks go first.
    assert [t.tenant for t in order(waiting, {"busy": 3})] == ["idle", "idle", "busy", "busy"]
    # With one run each, they alternate, the oldest head first.
    assert [t.tenant for t in order(waiting, {"busy": 1, "idle": 1})] == [
        "busy", "idle", "busy", "idle"]


def test_priority_beats_fair_share() -> None:
    waiting = [task(1, "a", priority=1), task(2, "a", priority=1), task(3, "b")]
    assert ids(order(waiting, {})) == ["task-0001", "task-0002", "task-0003"]


def test_admits_up_to_the_class_slots_and_the_global_cap() -> None:
    waiting = [task(n) for n in range(6)]
    assert ids(admit(order(waiting, {}), NOTHING, CAPACITY)) == ids(waiting[:3])
    # One small run active: two more small ones.
    active = Active({"small": 1}, {"t": 1})
    assert ids(admit(order(waiting, {}), active, CAPACITY)) == ids(waiting[:2])


def test_a_full_class_does_not_hold_up_other_classes() -> None:
    waiting = [task(1, size="large"), task(2, size="large"), task(3)]
    active = Active({"large": 1}, {"t": 1})
    assert ids(admit(order(waiting, {}), active, CAPACITY)) == ["task-0003"]


def test_nothing_overtakes_a_task_the_global_cap_holds_back() -> None:
    """The cap is full: a small task behind a waiting large one does not go first, even when
    the small class has room (else a stream of small tasks could starve the large one)."""
    capacity = CapacitySettings(max_active=2, classes=CAPACITY.classes)
    waiting = [task(1, size="large"), task(2)]
    active = Active({"small": 2}, {"t": 2})
    assert admit(order(waiting, {}), active, capacity) == []
    # One slot of the cap free: the large task (first in order) takes it, the small one waits.
    active = Active({"small": 1}, {"t": 1})
    assert ids(admit(order(waiting, {}), active, capacity)) == ["task-0001"]


def test_a_tenant_at_its_limit_waits_and_others_go() -> None:
    waiting = [task(1, "a"), task(2, "a"), task(3, "b")]
    limits = {"a": 1}
    chosen = admit(order(waiting, {}), NOTHING, CAPACITY, limits.get)
    assert ids(chosen) == ["task-0001", "task-0003"]
    # Already at its limit: none of its tasks.
    active = Active({"small": 1}, {"a": 1})
    assert ids(admit(order(waiting, {"a": 1}), active, CAPACITY, limits.get)) == ["task-0003"]


def test_a_class_with_no_slots_admits_nothing_of_it() -> None:
    capacity = CapacitySettings(max_active=4, classes=[
        SizeClass(name="small", max_images=200, slots=4),
        SizeClass(name="large", max_images=None, slots=0),
    ])
    assert ids(admit(order([task(1, size="large"), task(2)], {}), NOTHING, capacity)) == [
        "task-0002"]


@st.composite
def situations(draw: st.DrawFn) -> tuple[list[Waiting], Active, dict[str, int]]:
    tenants = ["a", "b", "c"]
    waiting = [
        task(n, draw(st.sampled_from(tenants)), priority=draw(st.integers(-2, 2)),
             size=draw(st.sampled_from(["small", "large"])), at=draw(st.integers(0, 50)))
        for n in range(draw(st.integers(0, 30)))
    ]
    by_class = {"small": draw(st.integers(0, 3)), "large": draw(st.integers(0, 1))}
    by_tenant: collections.Counter[str] = collections.Counter()
    for _ in range(sum(by_class.values())):
        by_tenant[draw(st.sampled_from(tenants))] += 1
    limits = {t: draw(st.integers(0, 4)) for t in tenants if draw(st.booleans())}
    return waiting, Active(by_class, dict(by_tenant)), limits


@given(situations())
def test_admission_never_exceeds_a_limit_and_follows_the_order(
    situation: tuple[list[Waiting], Active, dict[str, int]],
) -> None:
    waiting, active, limits = situation
    ordered = order(waiting, active.by_tenant)
    assert sorted(ids(ordered)) == sorted(ids(waiting))  # every waiting task, once
    chosen = admit(ordered, active, CAPACITY, limits.get)
    by_class = collections.Counter(active.by_class) + collections.Counter(
        t.size_class for t in chosen)
    by_tenant = collections.Counter(active.by_tenant) + collections.Counter(
        t.tenant for t in chosen)
    if chosen:
        assert sum(by_class.values()) <= CAPACITY.max_active
        for c in CAPACITY.classes:
            assert by_class[c.name] <= max(c.slots, active.by_class.get(c.name, 0))
        for tenant, limit in limits.items():
            assert by_tenant[tenant] <= max(limit, active.by_tenant.get(tenant, 0))
    # The chosen tasks keep the order's relative order.
    positions = [ids(ordered).index(t.task_id) for t in chosen]
    assert positions == sorted(positions)
    # A task passed over had no room (its class or tenant full at that point, or the cap).
    taken = {t.task_id for t in chosen}
    count_class = collections.Counter(active.by_class)
    count_tenant = collections.Counter(active.by_tenant)
    slots = {c.name: c.slots for c in CAPACITY.classes}
    for t in ordered:
        if sum(count_class.values()) >= CAPACITY.max_active:
            assert t.task_id not in taken
            continue
        fits = count_class[t.size_class] < slots[t.size_class] and (
            t.tenant not in limits or count_tenant[t.tenant] < limits[t.tenant])
        assert (t.task_id in taken) == fits, t
        if fits:
            count_class[t.size_class] += 1
            count_tenant[t.tenant] += 1
