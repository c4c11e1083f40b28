"""The prefill order: shortest first, retried and starving requests before everyone; the prefill worker:
the one that prefilled the prompt's prefix last (runtime/policy.py, worker_pool.PrefixAffinity)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hmoe.runtime.policy import Queued, blocking, cpu_threads, interleaves, prefill_order, prefill_worker_for
from hmoe.runtime.worker_pool import PrefixAffinity

STARVE_S = 10.0


def ids(items: list[Queued]) -> list[str]:
    return [q.request_id for q in items]


def test_a_short_prompt_goes_before_a_long_one_that_came_first():
    queue = [Queued("long", 32768, 0.0), Queued("short", 12, 0.5), Queued("mid", 2000, 0.2)]
    assert ids(prefill_order(queue, now=1.0, starve_s=STARVE_S)) == ["short", "mid", "long"]
    assert not any(blocking(q, 1.0, STARVE_S) for q in queue)


def test_a_request_waiting_starve_s_goes_first_and_blocks_the_rest():
    queue = [Queued("long", 32768, 0.0), Queued("short", 12, 9.0), Queued("retry", 500, 9.5, retried=True)]
    order = prefill_order(queue, now=10.0, starve_s=STARVE_S)
    assert ids(order) == ["retry", "long", "short"]  # retried first, then due by age, then the rest
    assert blocking(order[1], 10.0, STARVE_S) and not blocking(order[2], 10.0, STARVE_S)


def test_equal_prompts_keep_their_arrival_order():
    queue = [Queued(f"r{i}", 100, float(i)) for i in range(5)]
    assert ids(prefill_order(list(reversed(queue)), now=5.0, starve_s=STARVE_S)) == [f"r{i}" for i in range(5)]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 5), st.integers(1, 40_000), st.booleans()),  # gap before arrival, tokens, retried
        min_size=1,
        max_size=40,
    ),
    st.floats(0.5, 20),
)
def test_one_prefill_worker_never_starves_anyone(arrivals, starve_s):
    """Simulate one prefill worker (1 ms per token): whenever a due request waits, the next one started
    is the oldest due one; so every request starts within starve_s plus the work of those due before it."""
    now, pending, t = 0.0, [], 0.0
    for i, (gap, tokens, retried) in enumerate(arrivals):
        t += gap
        pending.append(Queued(f"r{i}", tokens, t, retried and i % 3 == 0))
    queue: list[Queued] = []
    while pending or queue:
        while pending and pending[0].arrival_s <= now:
            queue.append(pending.pop(0))
        if not queue:
            now = pending[0].arrival_s
            continue
        order = prefill_order(queue, now, starve_s)
        chosen = order[0]
        due = [q for q in queue if q.retried or now - q.arrival_s >= starve_s]
        if due:
            first_retried = [q for q in due if q.retried]
            expect = min(first_retried or due, key=lambda q: q.arrival_s)
            assert chosen == expect
        else:
            assert chosen.prompt_tokens == min(q.prompt_tokens for q in queue)
        queue.remove(chosen)
        now += chosen.prompt_tokens / 1000


# -- which prefill worker ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=6, unique=True),
    st.dictionaries(st.integers(0, 12), st.integers(0, 4096)),
)
def test_the_idle_worker_with_the_longest_matched_prefix_wins_else_the_first(idle, matched):
    chosen = prefill_worker_for(idle, matched)
    assert chosen in idle
    best = max(matched.get(w, 0) for w in idle)
    assert matched.get(chosen, 0) == best
    assert chosen == next(w for w in idle if matched.get(w, 0) == best)  # the pool's order among equals


def test_affinity_remembers_the_worker_that_prefilled_a_prefix_last_and_forgets_the_oldest():
    affinity = PrefixAffinity(max_keys=8)
    span = PrefixAffinity.SPAN
    doc = list(range(3 * span))
    affinity.record(b"a", doc)
    assert affinity.matched(doc + [1, 2]) == {b"a": 3 * span}
    assert affinity.matched(doc[:span] + [7] * span) == {b"a": span}  # the first span only
    assert affinity.matched(doc[: span - 1]) == {}  # shorter than a span: nothing to go by
    affinity.record(b"b", doc[: 2 * span])  # b prefilled the first two spans since
    assert affinity.matched(doc) == {b"b": 2 * span, b"a": 3 * span}
    for i in range(8):  # eight other prompts' spans push the oldest keys out
        affinity.record(b"c", [1000 + i] * span)
    assert len(affinity.owner) == 8 and affinity.matched(doc) == {}


@given(st.integers(0, 4096), st.integers(0, 65536), st.integers(0, 1024))
def test_only_a_short_prompt_interleaves_and_only_with_a_longer_one(prompt, running, limit):
    if interleaves(prompt, running, limit):
        assert 0 < prompt <= limit < running and limit > 0
    else:
        assert prompt == 0 or prompt > limit or running <= limit


@given(st.integers(1, 512), st.booleans())
def test_the_cores_follow_the_work(cpus, streams):
    prefill, decode = (cpu_threads(role, cpus, streams) for role in ("prefill", "decode"))
    assert prefill >= 1 and decode >= 1
    assert prefill + decode <= max(2, cpus)  # two kernel pools never spin on more cores than there are
    if streams:  # the GPU runs long prompts' experts: decode reads its experts on most of the cores
        assert decode >= prefill and decode >= cpus // 2
    else:
        assert prefill == decode == max(1, cpus // 2)
    assert cpu_threads("colocated", cpus, streams) == max(1, cpus - 1)
    assert (cpu_threads("prefill", 16, True), cpu_threads("decode", 16, True)) == (2, 13)
