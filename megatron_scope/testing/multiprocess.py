"""Run a function on N gloo ranks on CPU, one process each, and collect what every rank returns.

The tests and benchmarks use this to exercise tensor/pipeline/data parallel code without a GPU:

    results = run_on_ranks(my_check, world_size=4, args=(tp, pp))   # list, one per rank

`fn(rank, world_size, *args)` must be importable by module path (a module-level function) because
ranks start with the `spawn` method (fork is unsafe once torch has started its thread pools).
A rank that raises makes the whole call raise `RankFailedError` carrying that rank's traceback;
a rank that does not finish within `timeout` seconds makes it raise `RankTimeoutError` after all
ranks are killed, so a deadlocked collective fails a test instead of hanging CI.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable, Sequence

from megatron_scope.megatron.parallel import free_port


class RankFailedError(RuntimeError):
    """A rank raised; the message carries its traceback."""


class RankTimeoutError(RuntimeError):
    """At least one rank did not finish in time (a hang or a deadlocked collective)."""


def _rank_main(fn, rank, world_size, port, args, results, threads_per_rank):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads_per_rank)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        # By value: tensors put on a Queue travel as shared-memory handles that die with this process.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - any failure must reach the parent with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _kill_descendants()


def _kill_descendants() -> None:
    """Kill what this rank started (e.g. vLLM engine processes a failed test never closed), so nothing
    outlives the test holding memory or the test runner's output pipe."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        child.kill()
    psutil.wait_procs(children, timeout=10)


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 300.0,
    threads_per_rank: int | None = None,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return each rank's result in rank order."""
    __tracebackhide__ = True  # pytest shows the failing rank's traceback, not this loop
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, tuple(args), results, threads_per_rank),
            name=f"rank{rank}",
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(outcomes))
                    raise RankTimeoutError(
                        f"{fn.__name__}: ranks {missing} did not finish within {timeout:.0f}s "
                        f"(world_size={world_size}); finished: {sorted(outcomes)}"
                    ) from None
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead:
                    raise RankFailedError(
                        f"{fn.__name__}: rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                        "before reporting (killed, out of memory, or a crash in native code)"
                    )
                continue
            outcomes[rank] = (status, value)
            if status == "error":
                raise RankFailedError(f"{fn.__name__}: rank {rank} of {world_size} failed:\n{value}")
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(outcomes) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    import torch

    return [torch.load(io.BytesIO(outcomes[rank][1]), weights_only=False) for rank in range(world_size)]
