"""Scheduling decisions: plan, workflow_state, can_transition."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from p3s.dagengine import Plan, can_transition, plan, workflow_state
from p3s.states import TERMINAL_JOB_STATES, JobState, WorkflowState

P, Q, R = JobState.PENDING, JobState.QUEUED, JobState.RUNNING
FIN, FAIL, TOUT, EXP, LOST, DROP = (
    JobState.FINISHED,
    JobState.FAILED,
    JobState.TIMEOUT,
    JobState.EXPIRED,
    JobState.LOST,
    JobState.DROPPED,
)

# decode -> {tpc, display, purity} -> summary
DIAMOND: dict[str, tuple[str, ...]] = {
    "decode": (),
    "tpc": ("decode",),
    "display": ("decode",),
    "purity": ("decode",),
    "summary": ("tpc", "display", "purity"),
}
# beam, noise -> report; plus an independent chain noise -> noise_plot
MULTI_ROOT: dict[str, tuple[str, ...]] = {
    "beam": (),
    "noise": (),
    "noise_plot": ("noise",),
    "report": ("beam", "noise"),
}
# a -> b -> c -> d, and a -> x (a sibling branch)
CHAIN: dict[str, tuple[str, ...]] = {
    "a": (),
    "b": ("a",),
    "c": ("b",),
    "d": ("c",),
    "x": ("a",),
}


def states(
    parents: Mapping[str, Sequence[str]], default: JobState = P, **given: JobState
) -> dict[str, JobState]:
    return {n: given.get(n, default) for n in parents}


def run_to_end(
    parents: Mapping[str, Sequence[str]], outcome: Mapping[str, JobState]
) -> dict[str, JobState]:
    """Drive a workflow like the dispatcher: run ready jobs to `outcome` (else FINISHED)."""
    st = states(parents)
    for _ in range(len(parents) + 1):
        p = plan(parents, st)
        if not p.ready and not p.dropped:
            break
        for n in p.dropped:
            assert can_transition(st[n], DROP)
            st[n] = DROP
        for n in p.ready:
            for nxt in (Q, R, outcome.get(n, FIN)):
                assert can_transition(st[n], nxt)
                st[n] = nxt
    return st


# -- plan ------------------------------------------------------------------


def test_fresh_workflow_only_roots_ready() -> None:
    assert plan(DIAMOND, states(DIAMOND)) == Plan(ready=("decode",), dropped={})
    assert set(plan(MULTI_ROOT, states(MULTI_ROOT)).ready) == {"beam", "noise"}


def test_fan_out_after_root_finishes() -> None:
    p = plan(DIAMOND, states(DIAMOND, decode=FIN))
    assert p.ready == ("tpc", "display", "purity")
    assert dict(p.dropped) == {}


@pytest.mark.parametrize("unfinished", [P, Q, R])
def test_join_waits_for_every_parent(unfinished: JobState) -> None:
    # Two of three parents finished, the third not yet: the join is not ready.
    for late in ("tpc", "display", "purity"):
        st = states(DIAMOND, FIN, summary=P)
        st[late] = unfinished
        p = plan(DIAMOND, st)
        assert "summary" not in p.ready
        assert "summary" not in p.dropped
    st = states(DIAMOND, FIN, summary=P)
    assert plan(DIAMOND, st).ready == ("summary",)


def test_multi_root_join_waits_for_both_roots() -> None:
    p = plan(MULTI_ROOT, states(MULTI_ROOT, beam=FIN, noise=R))
    assert p.ready == ()
    p = plan(MULTI_ROOT, states(MULTI_ROOT, beam=FIN, noise=FIN))
    assert p.ready == ("noise_plot", "report")


def test_non_pending_nodes_never_planned() -> None:
    st = states(DIAMOND, decode=FIN, tpc=Q, display=R, purity=FIN)
    p = plan(DIAMOND, st)
    assert p.ready == () and dict(p.dropped) == {}


@pytest.mark.parametrize("bad", [FAIL, TOUT, EXP, LOST, DROP])
def test_failed_branch_drops_only_its_descendants(bad: JobState) -> None:
    st = states(DIAMOND, decode=FIN, tpc=bad, display=R, purity=P)
    p = plan(DIAMOND, st)
    assert dict(p.dropped) == {"summary": f"parent 'tpc' ended {bad.value}"}
    # The sibling branch goes on.
    assert p.ready == ("purity",)


def test_failed_root_drops_everything_below_it() -> None:
    p = plan(DIAMOND, states(DIAMOND, decode=FAIL))
    assert dict(p.dropped) == {
        "tpc": "parent 'decode' ended failed",
        "display": "parent 'decode' ended failed",
        "purity": "parent 'decode' ended failed",
        "summary": "upstream 'decode' ended failed",
    }
    assert p.ready == ()


def test_deep_descendant_names_the_origin() -> None:
    p = plan(CHAIN, states(CHAIN, a=FIN, b=FAIL, x=R))
    assert dict(p.dropped) == {
        "c": "parent 'b' ended failed",
        "d": "upstream 'b' ended failed",
    }


def test_already_dropped_intermediate_still_names_the_origin() -> None:
    # The dispatcher dropped c in an earlier pass; d is still pending.
    p = plan(CHAIN, states(CHAIN, a=FIN, b=TOUT, c=DROP, x=FIN))
    assert dict(p.dropped) == {"d": "upstream 'b' ended timeout"}


def test_shed_node_is_its_own_origin() -> None:
    # c was dropped under load (its parent finished): d names c.
    p = plan(CHAIN, states(CHAIN, a=FIN, b=FIN, c=DROP, x=FIN))
    assert dict(p.dropped) == {"d": "parent 'c' ended dropped"}


def test_multi_root_failure_keeps_other_root_branch() -> None:
    p = plan(MULTI_ROOT, states(MULTI_ROOT, beam=FAIL, noise=FIN))
    assert dict(p.dropped) == {"report": "parent 'beam' ended failed"}
    assert p.ready == ("noise_plot",)


def test_two_failed_parents_name_one_deterministically() -> None:
    st = states(DIAMOND, decode=FIN, tpc=FAIL, display=LOST, purity=FIN)
    first = plan(DIAMOND, st)
    assert first.dropped["summary"] == "parent 'display' ended lost"
    assert plan(DIAMOND, dict(reversed(st.items()))).dropped == first.dropped


def test_plan_accepts_string_states() -> None:
    st = {n: s.value for n, s in states(DIAMOND, decode=FIN).items()}
    assert plan(DIAMOND, st).ready == ("tpc", "display", "purity")  # type: ignore[arg-type]


def test_plan_refuses_incomplete_input() -> None:
    with pytest.raises(ValueError, match="summary"):
        plan(DIAMOND, {n: P for n in DIAMOND if n != "summary"})
    with pytest.raises(ValueError, match="ghost"):
        plan(DIAMOND, {**states(DIAMOND), "ghost": P})


def test_late_report_for_terminal_job_changes_nothing() -> None:
    st = states(DIAMOND, decode=FIN, tpc=FAIL, display=FIN, purity=FIN)
    before = plan(DIAMOND, st)
    for late in (R, FIN, FAIL, Q):
        # The dispatcher only applies a report when can_transition allows it.
        assert can_transition(st["tpc"], late) is False
    after = plan(DIAMOND, st)
    assert after == before
    assert dict(after.dropped) == {"summary": "parent 'tpc' ended failed"}


def test_run_to_end_diamond() -> None:
    assert set(run_to_end(DIAMOND, {}).values()) == {FIN}
    end = run_to_end(DIAMOND, {"display": FAIL})
    assert end == {
        "decode": FIN,
        "tpc": FIN,
        "display": FAIL,
        "purity": FIN,
        "summary": DROP,
    }
    assert workflow_state(end.values()) is WorkflowState.INCOMPLETE


def test_run_to_end_multi_root() -> None:
    end = run_to_end(MULTI_ROOT, {"noise": TOUT})
    assert end == {"beam": FIN, "noise": TOUT, "noise_plot": DROP, "report": DROP}


# -- workflow_state -----------------------------------------------------------


@pytest.mark.parametrize(
    ("job_states", "expected"),
    [
        ([FIN, FIN, FIN], WorkflowState.FINISHED),
        ([FIN, P], WorkflowState.RUNNING),
        ([FAIL, Q], WorkflowState.RUNNING),
        ([DROP, R, FIN], WorkflowState.RUNNING),
        ([FIN, FAIL, DROP], WorkflowState.INCOMPLETE),
        ([EXP], WorkflowState.INCOMPLETE),
        ([LOST, FIN], WorkflowState.INCOMPLETE),
    ],
)
def test_workflow_state(job_states: list[JobState], expected: WorkflowState) -> None:
    assert workflow_state(job_states) is expected
    assert workflow_state(iter(job_states)) is expected


# -- can_transition -----------------------------------------------------------


def test_forward_moves_allowed() -> None:
    assert can_transition(P, Q)
    assert can_transition(Q, R)
    assert can_transition(R, FIN)
    assert can_transition(R, FAIL)
    assert can_transition(R, TOUT)
    assert can_transition(R, LOST)
    # 'finished' may overtake 'running'.
    assert can_transition(Q, FIN)
    assert can_transition(P, EXP)
    assert can_transition(P, DROP)
    assert can_transition(Q, EXP)


def test_backward_and_same_moves_refused() -> None:
    assert not can_transition(Q, P)
    assert not can_transition(R, Q)
    assert not can_transition(R, P)
    assert not can_transition(P, P)
    assert not can_transition(Q, Q)
    assert not can_transition(R, R)


@pytest.mark.parametrize("new", [FIN, FAIL, TOUT, LOST])
def test_pending_never_ran(new: JobState) -> None:
    assert not can_transition(P, new)


@pytest.mark.parametrize("old", sorted(TERMINAL_JOB_STATES))
def test_terminal_is_never_left(old: JobState) -> None:
    for new in JobState:
        assert not can_transition(old, new)
