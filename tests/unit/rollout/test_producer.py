"""The rollout producer of --rollout-schedule one-step-off and async (`rollout/producer.py`), driven by a stand-in
trainer loop in this thread: every consumed rollout within η steps of the weights that train on it, each produced and
consumed once in iteration order whatever the (long-tailed) times, η = 0 in the sync schedule's order, one-step-off's
versions fixed, holds that wait for the rollout in progress and admit no new one, failures delivered to the step
that consumes them."""

import random
import threading
import time

import pytest

from megatron_scope.rollout.producer import RolloutProducer


def _drive(max_staleness, steps, produce_seconds, learn_seconds, ordered=False, refit_seconds=0.0, segments=1):
    """A stand-in trainer: step k takes rollout k, "learns" for learn_seconds[k - 1], then refits to version k while
    holding the engines. Returns (the producer's calls (iteration, version, length), per step (iteration consumed,
    version that sampled it, length)). `segments` > 1: partial rollouts, each drawn in that many segments with the
    refits interrupting between them; the version is then the tuple of each segment's."""
    produced, consumed, made = [], [], threading.Event()

    def produce(iteration, version, engine_idle_s):
        assert engine_idle_s >= 0 and made.wait(timeout=60)  # `producer` is assigned
        length = int(1000 * produce_seconds[iteration - 1]) + 1  # long generations are long responses
        versions = [version]
        for segment in range(segments):
            if segment:
                versions.append(producer.between_segments())
            time.sleep(produce_seconds[iteration - 1] / segments)
        version = tuple(versions) if segments > 1 else version
        produced.append((iteration, version, length))
        return iteration, version, length

    producer = RolloutProducer(produce, max_staleness, first=1, last=steps, version=0, ordered=ordered).start()
    made.set()
    try:
        for k in range(1, steps + 1):
            consumed.append(producer.result(k).result(timeout=60))
            time.sleep(learn_seconds[k - 1])
            with producer.holding_engines(new_version=k, interrupt=segments > 1):
                time.sleep(refit_seconds)
    finally:
        producer.close()
    return produced, consumed


@pytest.mark.parametrize("max_staleness", [0, 1, 2, 3])
def test_long_tailed_generation_every_rollout_within_the_bound_each_consumed_once(max_staleness):
    """Pareto-tailed generation and learning times: step k trains (weights k - 1) on rollout k, sampled at most η
    versions before; every produced rollout is consumed once, in order, so the consumed lengths are the produced ones
    (no bias toward short responses)."""
    rng = random.Random(max_staleness)
    steps = 14
    produce_seconds = [min(0.002 * rng.paretovariate(1.2), 0.05) for _ in range(steps)]
    learn_seconds = [min(0.002 * rng.paretovariate(1.2), 0.05) for _ in range(steps)]
    produced, consumed = _drive(max_staleness, steps, produce_seconds, learn_seconds)
    assert [iteration for iteration, _, _ in consumed] == list(range(1, steps + 1))
    assert consumed == produced  # produced in iteration order, each once, and consumed as produced
    for k, (_, version, _) in enumerate(consumed, start=1):
        assert 0 <= (k - 1) - version <= max_staleness, (k, version)


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_partial_rollouts_every_segment_within_the_bound(max_staleness):
    """Partial rollouts (refits between segments), long-tailed times: every segment of rollout k is sampled from a
    version in [k - 1 - η, k - 1], versions never decrease along a rollout, and each rollout is consumed once, in
    order."""
    rng = random.Random(10 + max_staleness)
    steps = 14
    produce_seconds = [min(0.004 * rng.paretovariate(1.2), 0.08) for _ in range(steps)]
    learn_seconds = [min(0.002 * rng.paretovariate(1.2), 0.05) for _ in range(steps)]
    produced, consumed = _drive(max_staleness, steps, produce_seconds, learn_seconds, segments=4)
    assert consumed == produced and [iteration for iteration, _, _ in consumed] == list(range(1, steps + 1))
    for k, (_, versions, _) in enumerate(consumed, start=1):
        assert list(versions) == sorted(versions)
        assert all(0 <= (k - 1) - version <= max_staleness for version in versions), (k, versions)


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.mark.parametrize("interrupt", [True, False])
def test_a_refit_waits_for_the_segment_in_progress_a_snapshot_for_the_rollout(interrupt):
    """A rollout in three segments, a hold asked for during its first: a refit (interrupt) runs at the first boundary
    and the later segments sample from its version; a checkpoint's snapshot waits for the whole rollout."""
    events, made = [], threading.Event()

    def produce(iteration, version, engine_idle_s):
        assert made.wait(timeout=60)  # `producer` is assigned
        events.append(("segment", version))
        _wait_until(lambda: producer._holds, "the hold")  # the hold is asked for during the first segment
        for _ in range(2):
            events.append(("segment", producer.between_segments()))
        return iteration

    producer = RolloutProducer(produce, 1, first=1, last=1, version=0).start()
    made.set()
    try:
        _wait_until(lambda: events, "the first segment")
        with producer.holding_engines(new_version=1 if interrupt else None, interrupt=interrupt):
            events.append(("hold",))
        assert producer.result(1).result(timeout=60) == 1
    finally:
        producer.close()
    if interrupt:
        assert events == [("segment", 0), ("hold",), ("segment", 1), ("segment", 1)]
    else:
        assert events == [("segment", 0), ("segment", 0), ("segment", 0), ("hold",)]


def test_zero_staleness_is_the_sync_schedules_order():
    """η = 0: rollout k is sampled from the weights of step k - 1 and starts only after that refit."""
    events = []
    lock = threading.Lock()

    def produce(iteration, version, engine_idle_s):
        with lock:
            events.append(("produce", iteration, version))
        return iteration

    producer = RolloutProducer(produce, 0, first=1, last=4, version=0).start()
    try:
        for k in range(1, 5):
            assert producer.result(k).result(timeout=60) == k
            time.sleep(0.01)  # a producer that ran ahead would have started rollout k + 1 by now
            with producer.holding_engines(new_version=k):
                with lock:
                    events.append(("refit", k))
    finally:
        producer.close()
    assert events == [("produce", 1, 0), ("refit", 1), ("produce", 2, 1), ("refit", 2), ("produce", 3, 2),
                      ("refit", 3), ("produce", 4, 3), ("refit", 4)]


def test_one_step_off_versions_do_not_depend_on_timing():
    """ordered, η = 1: rollout j is sampled from version max(j - 2, 0) even when the refit is ready before the
    producer has begun the next rollout (here: learning takes no time, generation does)."""
    steps = 6
    produced, consumed = _drive(1, steps, [0.02] * steps, [0.0] * steps, ordered=True)
    assert [version for _, version, _ in produced] == [max(j - 2, 0) for j in range(1, steps + 1)]
    assert consumed == produced


def test_a_hold_waits_for_the_rollout_in_progress_and_none_starts_during_it():
    started, release = threading.Event(), threading.Event()
    calls = []

    def produce(iteration, version, engine_idle_s):
        calls.append(iteration)
        if iteration == 1:
            started.set()
            assert release.wait(timeout=60)
        return iteration

    producer = RolloutProducer(produce, 5, first=1, last=3, version=0).start()
    try:
        assert started.wait(timeout=60)
        held = threading.Event()

        def hold():
            with producer.holding_engines():
                held.set()
                time.sleep(0.05)
                assert calls == [1]  # nothing started while held
        holder = threading.Thread(target=hold)
        holder.start()
        assert not held.wait(timeout=0.05)  # rollout 1 is in progress
        release.set()
        holder.join(timeout=60)
        assert held.is_set()
        assert [producer.result(j).result(timeout=60) for j in (1, 2, 3)] == [1, 2, 3]
    finally:
        producer.close()


def test_a_failed_rollout_raises_in_the_step_that_consumes_it_and_the_others_still_come():
    def produce(iteration, version, engine_idle_s):
        if iteration == 2:
            raise RuntimeError("the engine died on iteration 2")
        return iteration

    producer = RolloutProducer(produce, 2, first=1, last=3, version=0).start()
    try:
        assert producer.result(1).result(timeout=60) == 1
        with pytest.raises(RuntimeError, match="the engine died on iteration 2"):
            producer.result(2).result(timeout=60)
        assert producer.result(3).result(timeout=60) == 3
    finally:
        producer.close()


def test_rollouts_are_taken_in_order_and_the_untaken_ones_are_listed():
    producer = RolloutProducer(lambda iteration, version, idle: f"rollout {iteration}", 2, first=4, last=6,
                               version=3).start()
    try:
        with pytest.raises(ValueError, match="the producer's next rollout is iteration 4's \\(of 6\\), not 5's"):
            producer.result(5)
        assert producer.result(4).result(timeout=60) == "rollout 4"
        deadline = time.monotonic() + 60
        while len(producer.produced()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with producer.holding_engines():
            assert producer.produced() == [(5, "rollout 5"), (6, "rollout 6")]
    finally:
        producer.close()


def test_engine_idle_counts_the_wait_for_admission_not_the_trainers_holds():
    """η = 0: rollout 2 waits for step 1's learning (0.1 s: idle) and its refit (a 1 s hold: the engines' work)."""
    idle = {}

    def produce(iteration, version, engine_idle_s):
        idle[iteration] = engine_idle_s
        return iteration

    producer = RolloutProducer(produce, 0, first=1, last=2, version=0).start()
    try:
        producer.result(1).result(timeout=60)
        time.sleep(0.1)
        with producer.holding_engines(new_version=1):
            time.sleep(1.0)
        producer.result(2).result(timeout=60)
    finally:
        producer.close()
    assert 0.1 <= idle[2] < 1.0, idle
