"""Successive halving (fastunlearn.eval.halving): dropping, agreement with a full run, budgets."""

import itertools

import pytest

from fastunlearn.eval.halving import Budget, successive_halving


def curves(table):
    """advance() over a table {candidate: {resource: score}}, recording every call."""
    calls = []

    def advance(c, r):
        calls.append((c, r))
        return table[c][r]

    return advance, calls


def test_a_point_worse_at_every_stage_is_dropped():
    rungs = [1, 2, 4]
    table = {"good": {1: 0.6, 2: 0.85, 4: 0.9}, "ok": {1: 0.5, 2: 0.8, 4: 0.85}, "bad": {1: 0.1, 2: 0.2, 4: 0.3}}
    advance, calls = curves(table)
    res = successive_halving(list(table), rungs, advance, keep=2 / 3)
    assert ("bad", 1) in calls
    assert not any(c == "bad" and r > 1 for c, r in calls)
    assert res.reached("bad") == 1 and res.reached("good") == 4
    assert res.chosen == "good"


def test_chosen_equals_the_full_sweep_when_the_order_holds():
    # 27 candidates whose scores rise with the resource at different rates but never cross
    # (the order at rung 1 is the order at rung 9), plus deliberate near-ties.
    cands = [f"p{i}" for i in range(27)]
    table = {c: {r: (i % 9) * 0.01 + (i // 9) * 0.1 + r * (0.001 + 0.0001 * i) for r in (1, 3, 9)}
             for i, c in enumerate(cands)}
    full_advance, _ = curves(table)
    full = successive_halving(cands, [1, 3, 9], full_advance, keep=1.0)
    assert all(full.reached(c) == 9 for c in cands)
    want = max(cands, key=lambda c: table[c][9])
    assert full.chosen == want
    advance, calls = curves(table)
    res = successive_halving(cands, [1, 3, 9], advance, keep=1 / 3)
    assert res.chosen == want
    assert res.work == 27 * 1 + 9 * 2 + 3 * 6 < full.work == 27 * 9
    assert len(calls) == 27 + 9 + 3


def test_a_late_bloomer_within_keep_survives_and_one_outside_does_not():
    table = {"a": {1: 0.9, 2: 0.5}, "b": {1: 0.8, 2: 0.95}, "c": {1: 0.1, 2: 0.99}}
    res = successive_halving(list(table), [1, 2], curves(table)[0], keep=2 / 3)
    assert res.chosen == "b"  # c would win a full run, but rung 1 dropped it: the halving's bet
    full = successive_halving(list(table), [1, 2], curves(table)[0], keep=1.0)
    assert full.chosen == "c"


@pytest.mark.parametrize("work", [1, 5, 10, 13, 40])
def test_a_work_budget_is_never_exceeded(work):
    table = {c: {r: -abs(hash((c, r))) % 97 for r in (1, 2, 4, 8)} for c in range(9)}
    advance, calls = curves(table)
    res = successive_halving(list(table), [1, 2, 4, 8], advance, keep=0.5, budget={"work": work})
    spent = 0
    last = {}
    for c, r in calls:
        spent += r - last.get(c, 0)
        last[c] = r
    assert spent == res.work <= work
    assert res.stopped_by_budget == (work < 9 + 4 * 1 + 2 * 2 + 1 * 4)
    assert res.chosen in last


def test_a_seconds_budget_stops_before_a_step_that_would_not_fit():
    clock_now = [0.0]

    def clock():
        return clock_now[0]

    def advance(c, r):
        clock_now[0] += 1.0 * (r - reached.get(c, 0))  # one second per work unit
        reached[c] = r
        return -c

    reached = {}
    res = successive_halving(list(range(8)), [1, 2, 4], advance, keep=0.5, clock=clock, budget=10.5)
    assert res.seconds <= 10.5
    assert res.stopped_by_budget
    # Rung 1 (8 s) runs in full, then the best of rung 2 (each step 1 s) fit: 8 + 2 = 10 s.
    assert res.work == 10
    assert res.chosen == 0


def test_an_empty_budget_says_so():
    with pytest.raises(RuntimeError, match="larger budget"):
        successive_halving([0, 1], [2], lambda c, r: 0, budget={"work": 1})


@pytest.mark.parametrize("kwargs, match", [
    (dict(candidates=[], rungs=[1]), "no candidates"),
    (dict(candidates=[1, 1], rungs=[1]), "distinct"),
    (dict(candidates=[1], rungs=[]), "at least one"),
    (dict(candidates=[1], rungs=[2, 1]), "increase"),
    (dict(candidates=[1], rungs=[1], keep=0), "keep"),
    (dict(candidates=[1], rungs=[1], budget={"time": 3}), "budget keys"),
    (dict(candidates=[1], rungs=[1], budget=-1), "seconds"),
])
def test_bad_input_is_refused(kwargs, match):
    kwargs.setdefault("advance", lambda c, r: 0)
    with pytest.raises(ValueError, match=match):
        successive_halving(**kwargs)


def test_budget_of_accepts_each_form():
    assert Budget.of(None) == Budget()
    assert Budget.of(3) == Budget(seconds=3.0)
    assert Budget.of({"work": 4}) == Budget(work=4)
    with pytest.raises(TypeError):
        Budget.of("3s")


def test_ties_keep_the_input_order():
    res = successive_halving(["x", "y", "z"], [1, 2], lambda c, r: 1.0, keep=1 / 3)
    assert res.chosen == "x" and res.survivors == ["x"]
    assert list(itertools.chain.from_iterable(res.scores[c] for c in "yz")) == [1, 1]
