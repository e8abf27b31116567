"""Grading in spawned worker processes with a hard wall-clock deadline per answer.

A verifier's grading code may hang (a symbolic comparison that never ends), crash its process (a segfault in a C
extension, an OOM kill), raise, or need the main thread (math-verify's signal.alarm). `GradingPool` runs it in
`num_workers` processes started with "spawn": per answer one pipe round trip carries a request out and a status
back; a worker past its deadline is killed and the answer gets STATUS_TIMEOUT, one that dies gets
STATUS_WORKER_DIED, and either is restarted on the next use. The math verifier and custom verifiers
(`rewards.custom`) grade through it.

The worker side is any function `target(conn, *target_args)` that prepares itself and then `serve`s: "ready", then
each request received on `conn` answered with a status string, or (STATUS_VERIFIER_ERROR, "<Type>: <message>") for
an exception of its grading code, until None or the pipe closes.
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.connection
import threading
import time
import weakref
from typing import Callable

from megatron_scope.rewards.base import STATUS_VERIFIER_ERROR

STATUS_TIMEOUT = "timeout"
"""The worker passed the hard deadline and was killed."""
STATUS_WORKER_DIED = "worker_died"
"""The worker process died while grading."""


def serve(conn, grade: Callable[[tuple], str]) -> None:
    """A worker's loop, once it is ready: "ready", then per request `grade(request)` (a status) sent back, or
    (STATUS_VERIFIER_ERROR, "<Type>: <message>") when it raises, until None or the pipe closes."""
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            reply = grade(request)
        except Exception as error:  # noqa: BLE001 - the grading code failing on one answer grades only that answer
            reply = (STATUS_VERIFIER_ERROR, f"{type(error).__name__}: {error}")
        conn.send(reply)


class Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, process, conn):
        self.process = process
        self.conn = conn

    def kill(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)


def shutdown_workers(workers: list) -> None:
    """Stop every worker: a polite None, then kill whatever is still running (also used at gc/exit)."""
    for slot, worker in enumerate(workers):
        if worker is None:
            continue
        try:
            worker.conn.send(None)
        except OSError:
            pass
        worker.process.join(timeout=1)
        worker.kill()
        workers[slot] = None


class GradingPool:
    """`num_workers` spawned processes running `target`, each request under a `timeout_seconds` deadline.

    Thread-safe (calls are serialised by a lock). Workers start on first use and are reused; they are daemon
    processes, also stopped when the pool is garbage-collected or Python exits. `start_hint` ends the error of a
    worker that does not report ready within `start_timeout_seconds` (e.g. which package it imports).
    """

    def __init__(self, target: Callable, target_args: tuple, num_workers: int, timeout_seconds: float,
                 start_timeout_seconds: float, name: str, start_hint: str = ""):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds!r}")
        if not start_timeout_seconds > 0:
            raise ValueError(f"worker_start_timeout_seconds must be > 0, got {start_timeout_seconds!r}")
        self.target, self.target_args, self.name, self.start_hint = target, target_args, name, start_hint
        self.num_workers = num_workers
        self.timeout_seconds = float(timeout_seconds)
        self.start_timeout_seconds = float(start_timeout_seconds)
        self.workers: list[Worker | None] = [None] * num_workers
        self.num_timeouts = 0
        """Requests whose worker was killed at the deadline, over the pool's life."""
        self.num_worker_deaths = 0
        """Workers that died while grading, over the pool's life."""
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self.closed = False
        self._finalizer = weakref.finalize(self, shutdown_workers, self.workers)

    def close(self) -> None:
        """Stop the workers; the pool cannot be used afterwards."""
        with self._lock:
            self.closed = True
            self._finalizer()

    def run(self, jobs: list[tuple[int, tuple]]) -> tuple[dict[int, str], dict[int, str]]:
        """Grade (index, request) jobs on the workers; ({index: status}, {index: the error text of a
        STATUS_VERIFIER_ERROR}). Holds the lock throughout."""
        statuses: dict[int, str] = {}
        errors: dict[int, str] = {}
        if not jobs:
            return statuses, errors
        with self._lock:
            if self.closed:
                raise RuntimeError(f"this {self.name} verifier is closed")
            pending = collections.deque(jobs)
            busy: dict[int, tuple[int, float]] = {}  # slot -> (job index, deadline)
            while pending or busy:
                if pending and any(self.workers[slot] is None for slot in range(self.num_workers) if slot not in busy):
                    self._start_missing_workers()
                for slot in range(self.num_workers):
                    if slot in busy or not pending:
                        continue
                    index, request = pending.popleft()
                    try:
                        self.workers[slot].conn.send(request)
                    except OSError:  # the worker died while idle: restart it and retry the job
                        self._kill_worker(slot)
                        pending.appendleft((index, request))
                        continue
                    busy[slot] = (index, time.monotonic() + self.timeout_seconds)
                if not busy:
                    continue
                earliest_deadline = min(deadline for _, deadline in busy.values())
                ready = multiprocessing.connection.wait(
                    [self.workers[slot].conn for slot in busy], timeout=max(0.0, earliest_deadline - time.monotonic()))
                now = time.monotonic()
                for slot, (index, deadline) in list(busy.items()):
                    worker = self.workers[slot]
                    if worker.conn in ready:
                        try:
                            reply = worker.conn.recv()
                            if isinstance(reply, tuple):  # (STATUS_VERIFIER_ERROR, "<Type>: <message>")
                                reply, errors[index] = reply
                            statuses[index] = reply
                        except (EOFError, OSError):
                            statuses[index] = STATUS_WORKER_DIED
                            self.num_worker_deaths += 1
                            self._kill_worker(slot)
                        del busy[slot]
                    elif now >= deadline:
                        statuses[index] = STATUS_TIMEOUT
                        self.num_timeouts += 1
                        self._kill_worker(slot)
                        del busy[slot]
        return statuses, errors

    def _start_missing_workers(self) -> None:
        """Spawn every missing worker and wait until each has reported ready."""
        started = []
        for slot, worker in enumerate(self.workers):
            if worker is None:
                parent_conn, child_conn = self._context.Pipe(duplex=True)
                process = self._context.Process(target=self.target, args=(child_conn, *self.target_args),
                                                name=f"{self.name}-verifier-{slot}", daemon=True)
                process.start()
                child_conn.close()
                self.workers[slot] = Worker(process, parent_conn)
                started.append(slot)
        deadline = time.monotonic() + self.start_timeout_seconds
        for slot in started:
            worker = self.workers[slot]
            ready = worker.conn.poll(max(0.0, deadline - time.monotonic()))
            message = None
            if ready:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    message = None
            if message != "ready":
                exit_code = worker.process.exitcode
                shutdown_workers(self.workers)
                raise RuntimeError(f"{self.name} verifier worker {slot} did not start within "
                                   f"{self.start_timeout_seconds} s (exit code {exit_code})"
                                   + (f"; {self.start_hint}" if self.start_hint else ""))

    def _kill_worker(self, slot: int) -> None:
        self.workers[slot].kill()
        self.workers[slot] = None
