"""The rollout leader's producer for --rollout-schedule one-step-off and async: one thread that produces each step's
rollout (sample, verify, score) as early as the staleness bound admits it, while the trainer trains.

Admission (AReaL's rule, with a step's prompt groups as the unit): the rollout of iteration j may start once the
engines hold the weights of version v >= j - 1 - η (version v: after v optimizer steps; η = --max-staleness), so the
step that trains on it, from the weights of version j - 1, trains on responses at most η steps stale. Rollouts are
produced and consumed in iteration order, each exactly once by the step it was drawn for: nothing is dropped,
re-queued or reordered, so the consumed samples are the produced ones (no bias toward short responses).

The engines are the producer's except while the trainer holds them (`holding_engines`: a refit, a validation, a
checkpoint's snapshot); a hold waits for the rollout in progress, and no rollout starts during one. With partial
rollouts (--partial-rollout-tokens, `rollout.partial`) a rollout is drawn in segments and calls `between_segments`
after each: a refit or a validation (an interrupting hold) runs there, and the rollout's later segments sample from
the weights the refit brought, so such a hold waits for one segment rather than the whole rollout. A checkpoint's
snapshot still waits for the whole rollout: the data position it saves is the one after the rollouts it holds.
Admission reads the version a rollout starts from, its oldest tokens', so the bound holds for every token.

- "async" (greedy): a rollout starts as soon as it is admitted and the engines are free, so versions depend on timing
  (staleness 0..η) and a slow rollout is absorbed by the ones produced ahead of it;
- "one-step-off" (η = 1, ordered): before the engines change version, every rollout admitted at the old one has
  started, so rollout j is sampled from version max(j - 2, 0), whatever the timing (verl's one-step-off trainer);
- η = 0 admits rollout j only after the refit of step j - 1: the sync schedule's order.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from typing import Any, Callable


class RolloutProducer:
    """Produces `produce(iteration, version, engine_idle_s)` for iterations `first`, `first + 1`, ... `last` in one
    thread (from `start()`), each once admitted (module docstring); `result(j)` is iteration j's future. `version`: the
    engines' weight version now; `engine_idle_s`: the seconds the engines waited for admission since the last rollout
    (holds are not idle: the trainer uses the engines). `ordered`: one-step-off's fixed versions (a hold that changes
    the version first waits for every admitted rollout to start)."""

    def __init__(self, produce: Callable[[int, int, float], Any], max_staleness: int, first: int, last: int, version: int,
                 ordered: bool = False):
        if max_staleness < 0:
            raise ValueError(f"--max-staleness must be >= 0, got {max_staleness}")
        self._produce, self.max_staleness, self._last, self._ordered = produce, max_staleness, last, ordered
        self._next, self._taken, self._version = first, first, version
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._holds, self._busy, self._stopped = 0, False, False
        self._interrupts, self._paused = 0, False  # holds that may run between a rollout's segments; one runs there
        self._idle_seconds, self._idle_since = 0.0, time.perf_counter()  # engines free, no hold, not admitted
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    def start(self) -> "RolloutProducer":
        """Start producing (a rollout drawn in segments may call `between_segments` on the producer it got)."""
        self._thread.start()
        return self

    def _admitted(self) -> bool:
        return self._next <= self._last and self._next - 1 - self.max_staleness <= self._version

    def _future(self, iteration: int) -> concurrent.futures.Future:
        return self._futures.setdefault(iteration, concurrent.futures.Future())

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._stopped or (not self._holds and self._admitted()))
                if self._stopped:
                    return
                iteration, version, self._busy = self._next, self._version, True
                self._next += 1
                future = self._future(iteration)
                idle, self._idle_seconds = self._idle_seconds + time.perf_counter() - self._idle_since, 0.0
            try:
                future.set_result(self._produce(iteration, version, idle))
            except BaseException as error:  # noqa: BLE001 - the step that consumes it raises it
                future.set_exception(error)
            with self._changed:
                if iteration < self._taken:  # the trainer holds the future already
                    del self._futures[iteration]
                self._busy = False
                self._idle_since = time.perf_counter()
                self._changed.notify_all()

    def result(self, iteration: int) -> concurrent.futures.Future:
        """Iteration `iteration`'s rollout, a future; the rollouts are taken once each, in iteration order."""
        with self._changed:
            if iteration != self._taken or iteration > self._last:
                raise ValueError(f"the producer's next rollout is iteration {self._taken}'s (of {self._last}), not "
                                 f"{iteration}'s")
            self._taken += 1
            future = self._future(iteration)
            if future.done():  # else the producer forgets it once done
                del self._futures[iteration]
            return future

    def produced(self) -> list[tuple[int, Any]]:
        """(iteration, rollout) of the finished rollouts nobody has taken yet, in iteration order (call while holding
        the engines: then none is in progress); a failed one raises its error."""
        with self._changed:
            return [(j, self._futures[j].result()) for j in sorted(self._futures)
                    if j >= self._taken and self._futures[j].done()]

    def between_segments(self) -> int:
        """Called by the rollout in progress between two of its segments (partial rollouts): lets the interrupting holds
        that wait run first; returns the engines' weight version for its next segment."""
        with self._changed:
            if self._interrupts:
                self._paused = True
                self._changed.notify_all()
                self._changed.wait_for(lambda: not self._interrupts)
                self._paused = False
            return self._version

    @contextlib.contextmanager
    def holding_engines(self, new_version: int | None = None, interrupt: bool = False):
        """The engines, free of rollouts: waits for the one in progress (ordered: first for every admitted one to
        start), or with `interrupt` only for its current segment when it is drawn in segments (`between_segments`);
        none starts or goes on until the block ends. `new_version`: the engines' weight version after the block (a
        refit), which admits the rollouts it allows. Re-entrant; a hold that waits for the whole rollout cannot be
        taken inside one that interrupted it."""
        with self._changed:
            if self._ordered and new_version is not None and new_version != self._version:
                self._changed.wait_for(lambda: self._stopped or not self._admitted())
            self._holds += 1
            self._interrupts += interrupt
            self._changed.wait_for(lambda: not self._busy or (interrupt and self._paused))
            if self._holds == 1 and not self._paused:  # the engines are the trainer's from here: not idle
                self._idle_seconds += time.perf_counter() - self._idle_since
        try:
            yield
        finally:
            with self._changed:
                self._holds -= 1
                self._interrupts -= interrupt
                if new_version is not None:
                    self._version = new_version
                if not self._holds and not self._busy:
                    self._idle_since = time.perf_counter()
                self._changed.notify_all()

    def close(self) -> None:
        """Stop after the rollout in progress, if any (rollouts not started are not produced)."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        self._thread.join()
