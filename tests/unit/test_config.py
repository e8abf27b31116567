"""The run configuration: every flag reaches it, each cross-flag rule refuses what it should, and the facts
derived from it (which teacher, what the loss reads, how a step splits) are right."""

import argparse

import pytest

from megatron_scope.arguments import build_parser
from megatron_scope.config import BaselineConfig, build_config
from megatron_scope.testing.tiny import tiny_run_config

REQUIRED = ["--student-hf", "s", "--teacher-hf", "t", "--tokenizer", "t", "--train-data", "d"]


class _Recording(argparse.Namespace):
    """A namespace that records which attributes were read."""

    def __getattribute__(self, name):
        if not name.startswith("_"):
            object.__getattribute__(self, "_read").add(name)
        return object.__getattribute__(self, name)


def test_every_flag_reaches_the_configuration():
    args = build_parser().parse_args(REQUIRED, namespace=_Recording())
    object.__setattr__(args, "_read", set())
    build_config(args)
    unread = set(vars(args)) - args._read - {"_read"}
    assert not unread, f"flags parsed but never put into the RunConfig: {sorted(unread)}"


@pytest.mark.parametrize("algorithm,kl,ok", [
    ("scope", "reverse", False), ("opd", "jsd", False), ("srpo", "forward", False),
    ("opd", "topk", True), ("scope", "k3", True), ("opd", "k1", True), ("tropd", "k2", True), ("grpo", "reverse", True),
    ("sft", "reverse", True),
])
def test_which_objectives_a_vllm_teacher_can_serve(algorithm, kl, ok):
    """A vLLM teacher engine gives the log-probs of the sampled tokens and a top-k, not the vocabulary logits."""
    # TrOPD's outliers get the forward KL over the teacher's top-k (the paper's)
    loss = dict(algorithm=algorithm, kl=kl, topk=4 if kl == "topk" or algorithm == "tropd" else None)
    if algorithm == "srpo":  # SRPO with an external teacher (its default self-teacher reads no teacher at all)
        loss["baselines"] = BaselineConfig(srpo_teacher="external")
    if ok:
        config = tiny_run_config(models=dict(teacher_backend="vllm"), loss=loss, rollout=dict(group_size=2))
        assert config.remote_teacher == (algorithm not in ("grpo", "sft")) and not config.colocated_teacher
    else:
        with pytest.raises(ValueError, match=f"--scope-kl {kl} needs the teacher's logits over the vocabulary; a vLLM"):
            tiny_run_config(models=dict(teacher_backend="vllm"), loss=loss)


def test_teacher_facts():
    assert tiny_run_config().colocated_teacher and not tiny_run_config().remote_teacher
    with pytest.raises(ValueError, match="--scope-algorithm opd reads the teacher: give --teacher-hf"):
        tiny_run_config(models=dict(teacher_hf=None), loss=dict(algorithm="opd"))
    grpo = tiny_run_config(models=dict(teacher_hf=None), loss=dict(algorithm="grpo"), rollout=dict(group_size=2))
    assert not grpo.colocated_teacher and not grpo.loss.needs_teacher
    with pytest.raises(ValueError, match="--teacher-backend vllm needs --teacher-hf"):
        tiny_run_config(models=dict(teacher_hf=None, teacher_backend="vllm"), loss=dict(algorithm="grpo"))
    topk = tiny_run_config(loss=dict(kl="topk", topk=16)).loss
    assert (topk.teacher_topk, topk.needs_teacher_logits) == (16, False)
    external = BaselineConfig(srpo_teacher="external")
    srpo = tiny_run_config(loss=dict(algorithm="srpo", kl="reverse", baselines=external), rollout=dict(group_size=2))
    assert srpo.loss.needs_teacher_logits and srpo.colocated_teacher and not srpo.loss.self_teacher
    assert tiny_run_config(loss=dict(kl="k1")).loss.teacher_topk == 0


def test_several_teachers_are_named_and_routed_by_a_column():
    """--teacher NAME=HF_DIR (repeatable) with --teacher-route-key; each wrong combination is refused naming the flags."""
    def parse(*flags):
        return build_config(build_parser().parse_args(["--student-hf", "s", "--tokenizer", "t", "--train-data", "d",
                                                       *("--teacher-hf" if f == "TEACHER_HF" else f for f in flags)]))

    config = parse("--teacher", "math=/m", "--teacher", "code=/c", "--teacher-route-key", "domain")
    assert config.models.teacher_dirs == {"math": "/m", "code": "/c"} and config.colocated_teacher
    assert config.data.dataset_keys()["teacher"] == "domain"
    assert parse("--teacher", "math=/m").models.teacher_dirs == {"math": "/m"}  # one named teacher: no route needed
    assert parse("TEACHER_HF", "/t").models.teacher_dirs == {"teacher": "/t"}
    refusals = {
        ("TEACHER_HF", "/t", "--teacher", "a=/a"): "--teacher-hf and --teacher both name teachers",
        ("--teacher", "a b=/a"): r"a teacher's name is letters, digits",
        ("--teacher", "a=/a", "--teacher", "a=/b", "--teacher-route-key", "k"): r"--teacher names \['a', 'a'\] repeat",
        ("--teacher", "a"): "--teacher 'a': expected NAME=VALUE",
        ("--teacher", "a=/a", "--teacher", "b=/b"): "--teacher names 2 teachers \\(a, b\\): give --teacher-route-key",
        ("TEACHER_HF", "/t", "--teacher-route-key", "k"): "--teacher-route-key k names each row's teacher by its --teacher",
        ("--teacher", "a=http://a:8000", "--teacher", "b=/b", "--teacher-route-key", "k", "--teacher-backend",
         "server", "--scope-kl", "k1"): r"teacher b at '/b': a served teacher is its servers' http\(s\) base URLs",
        ("--teacher", "a=/a", "--teacher", "b=/b", "--teacher-route-key", "k", "--scope-group-size", "3",
         "--micro-batch-size", "2", "--prompts-per-step", "2"): "--scope-group-size 3 must be a multiple of",
        ("--teacher-route-key", "k", "--scope-algorithm", "grpo", "--scope-group-size", "2"):
            "--teacher-route-key k routes prompts to teachers; --scope-algorithm grpo reads none",
    }
    for flags, message in refusals.items():
        with pytest.raises(ValueError, match=message):
            parse(*flags)
    served = parse("--teacher", "a=http://a:8000,http://a2:8000", "--teacher", "b=http://b:8000", "--teacher-route-key",
                   "k", "--teacher-backend", "server", "--scope-kl", "topk", "--scope-topk", "8")
    assert served.served_teacher and served.models.teacher_dirs == {"a": "http://a:8000,http://a2:8000",
                                                                    "b": "http://b:8000"}
    engines = parse("--teacher", "a=/a", "--teacher", "b=/b", "--teacher-route-key", "k", "--teacher-backend", "vllm",
                    "--scope-kl", "k1")  # a vLLM engine per teacher beside each rollout engine
    assert engines.teacher_engine and engines.remote_teacher and not engines.colocated_teacher
    guided = parse("--teacher", "a=/a", "--teacher", "b=/b", "--teacher-route-key", "k", "--scope-algorithm", "tropd",
                   "--scope-kl", "reverse", "--tropd-prefix-fraction", "0.5")  # each teacher writes its prompts'
    assert guided.teacher_engine and guided.colocated_teacher and guided.loss.tropd_guidance
    mixed = parse("--teacher", "a=/a", "--teacher", "b=http://b:8000", "--teacher-route-key", "k", "--scope-kl", "topk",
                  "--scope-topk", "8")  # a teacher given as URLs is served, the other co-located
    assert (mixed.teachers_on("megatron"), mixed.teachers_on("server")) == (["a"], ["b"])
    assert mixed.colocated_teacher and mixed.served_teacher and mixed.remote_teacher and not mixed.teacher_engine
    with pytest.raises(ValueError, match=r"needs the teacher's logits over the vocabulary; a vLLM teacher \(teacher b: "
                                         r"server\)"):
        parse("--teacher", "a=/a", "--teacher", "b=http://b:8000", "--teacher-route-key", "k")
    budget = parse("--teacher", "a=/a", "--teacher", "b=/b", "--teacher-route-key", "k", "--scope-group-size", "3",
                   "--micro-batch-size", "2", "--prompts-per-step", "2", "--max-tokens-per-microbatch", "64")
    assert budget.loop.max_tokens_per_microbatch == 64  # token-budget microbatches split each teacher's rows


def test_teachers_take_turns_only_where_they_are_co_located():
    """--teacher-residency scoring moves co-located teachers' weights: refused for a run without one."""
    def parse(*flags):
        return build_config(build_parser().parse_args(["--student-hf", "s", "--tokenizer", "t", "--train-data", "d",
                                                       "--teacher-residency", "scoring", *flags]))

    assert parse("--teacher", "a=/a", "--teacher", "b=/b", "--teacher-route-key", "k").models.teacher_residency == \
        "scoring"
    refusals = {("--teacher-hf", "/t", "--teacher-backend", "vllm", "--scope-kl", "k1"): "--teacher-backend vllm",
                ("--scope-algorithm", "grpo", "--scope-group-size", "2"):
                    "--teacher-backend megatron, --scope-algorithm"}
    for flags, what in refusals.items():
        with pytest.raises(ValueError, match=f"--teacher-residency scoring moves co-located teachers' weights; this "
                                             f"run has none \\({what}"):
            parse(*flags)


def test_each_teacher_names_its_own_tokenizer():
    """--teacher-tokenizer: one PATH for --teacher-hf's teacher, NAME=PATH per --teacher; a name that is no teacher,
    a repeated name or a second PATH is refused."""
    def parse(*flags):
        return build_config(build_parser().parse_args(["--student-hf", "s", "--tokenizer", "t", "--train-data", "d",
                                                       *flags]))

    one = parse("--teacher-hf", "/t", "--teacher-tokenizer", "/tok=v2")  # the whole value is the path
    assert one.models.teacher_tokenizers == (("teacher", "/tok=v2"),)
    several = parse("--teacher", "a=/a", "--teacher", "b=/b", "--teacher-route-key", "k",
                    "--teacher-tokenizer", "b=/tb")
    assert several.models.teacher_tokenizers == (("b", "/tb"),)  # a's tokenizer not checked: not given
    refusals = {
        ("--teacher-hf", "/t", "--teacher-tokenizer", "/x", "--teacher-tokenizer", "/y"):
            "--teacher-tokenizer is given 2 times for --teacher-hf's one teacher",
        ("--teacher", "a=/a", "--teacher-tokenizer", "/x"): "--teacher-tokenizer '/x': expected NAME=VALUE",
        ("--teacher", "a=/a", "--teacher-tokenizer", "c=/x"):
            "--teacher-tokenizer: the tokenizer of teacher c, but the teachers are a",
        ("--teacher", "a=/a", "--teacher-tokenizer", "a=/x", "--teacher-tokenizer", "a=/y"):
            r"--teacher-tokenizer gives teacher \['a', 'a'\] tokenizers",
        ("--scope-algorithm", "grpo", "--scope-group-size", "2", "--teacher-tokenizer", "/x"):
            "no --teacher-hf or --teacher names a teacher",
    }
    for flags, message in refusals.items():
        with pytest.raises(ValueError, match=message):
            parse(*flags)


def test_a_served_teacher_is_a_list_of_urls_read_like_a_vllm_teacher():
    """--teacher-backend server: --teacher-hf holds the servers' base URLs; it scores like a vLLM teacher (sampled
    tokens and a top-k) and starts no engine of its own; URLs go with it and only with it."""
    served = tiny_run_config(models=dict(teacher_backend="server", teacher_hf="http://a:8000,https://b:8000"),
                             loss=dict(kl="topk", topk=8))
    assert served.remote_teacher and served.served_teacher and not served.teacher_engine
    assert not served.colocated_teacher and served.models.teacher_dirs == {"teacher": "http://a:8000,https://b:8000"}
    for models in (dict(teacher_backend="server"), dict(teacher_backend="server", teacher_hf="/ckpt/teacher"),
                   dict(teacher_hf="http://a,/ckpt"), dict(teacher_backend="server", teacher_hf="http://a,/ckpt")):
        with pytest.raises(ValueError, match="--teacher-backend server"):
            tiny_run_config(models=models, loss=dict(kl="k1"))
    # URLs under another backend: that teacher is served (it mixes with co-located or vLLM ones)
    by_url = tiny_run_config(models=dict(teacher_hf="http://a:8000"), loss=dict(kl="k1"))
    assert by_url.served_teacher and not by_url.colocated_teacher and by_url.teachers_on("server") == ["teacher"]
    with pytest.raises(ValueError, match="--scope-kl reverse needs the teacher's logits over the vocabulary; a vLLM "
                                         r"teacher \(teacher: server\)"):
        tiny_run_config(models=dict(teacher_backend="server", teacher_hf="http://a:8000"))
    with pytest.raises(ValueError, match="TrOPD's guidance has a vLLM engine of the teacher write prefixes"):
        tiny_run_config(models=dict(teacher_backend="server", teacher_hf="http://a:8000"),
                        loss=dict(algorithm="tropd", kl="k1", topk=8, baselines=BaselineConfig(tropd_prefix_fraction=0.5)))


def test_how_a_step_splits_over_data_parallel_ranks():
    config = tiny_run_config(rollout=dict(prompts_per_step=8, group_size=3), loop=dict(micro_batch_size=6))
    assert config.local_sequences(4) == 6
    assert config.batch_errors(4) == [] and config.batch_errors(2) == []  # 12 sequences, micro-batches of 6
    assert "--prompts-per-step 8 is not divisible by the data-parallel size 3" in config.batch_errors(3)[0]
    assert "3 sequences per data-parallel rank" in config.batch_errors(8)[0]


def test_warmup_must_end_before_the_last_iteration():
    with pytest.raises(ValueError, match="need --lr-warmup-iters < --train-iters"):
        build_config(build_parser().parse_args(REQUIRED + ["--train-iters", "5", "--lr-warmup-iters", "5"]))


@pytest.mark.parametrize("teacher", ["ema", "current"])
def test_srpo_self_teacher_reads_no_external_teacher(teacher):
    """SRPO's self-teacher is the student (or its EMA): its full distribution comes from the student's own layers,
    so it needs no --teacher-hf, and one given is refused rather than silently unused."""
    loss = dict(algorithm="srpo", baselines=BaselineConfig(srpo_teacher=teacher))
    config = tiny_run_config(models=dict(teacher_hf=None), loss=loss, rollout=dict(group_size=2))
    assert config.loss.self_teacher and config.loss.needs_teacher_logits
    assert not (config.loss.needs_teacher or config.colocated_teacher or config.remote_teacher)
    with pytest.raises(ValueError, match=f"--srpo-teacher {teacher} distils toward the student itself"):
        tiny_run_config(loss=loss, rollout=dict(group_size=2))
    with pytest.raises(ValueError, match="--srpo-reprompt-template must contain {solution}"):
        BaselineConfig(srpo_reprompt_template="{prompt} with no demonstration")


def test_tropd_is_the_papers_by_default_and_its_sampled_estimators_need_the_teachers_top_k():
    """TrOPD's outliers get the forward KL (arXiv 2606.01249 §3.3): over the vocabulary with the default full
    reverse KL; a sampled estimator alone cannot give it, and the error names both ways out."""
    config = tiny_run_config(loss=dict(algorithm="tropd"))
    assert config.loss.baselines.tropd_outlier == "forward" and config.loss.tropd_forward_outliers
    assert config.loss.teacher_topk == 0  # the co-located teacher's full logits
    assert tiny_run_config(loss=dict(algorithm="tropd", kl="k1", topk=64)).loss.teacher_topk == 64
    with pytest.raises(ValueError, match=r"--tropd-outlier forward needs the teacher's distribution: .*--scope-topk K, "
                                         r"the paper's K = 64\), not --scope-kl k1 alone \(or --tropd-outlier mask/clip"):
        tiny_run_config(loss=dict(algorithm="tropd", kl="k1"))
    assert tiny_run_config(loss=dict(algorithm="tropd", kl="k1", baselines=BaselineConfig(tropd_outlier="mask")))


@pytest.mark.parametrize("backend", ["megatron", "vllm"])
def test_tropd_guidance_runs_a_teacher_engine_beside_either_teacher(backend):
    """TrOPD's guidance prefixes come from a vLLM engine of the teacher: the same engine that scores with
    --teacher-backend vllm, and one of its own beside a co-located teacher."""
    guided = dict(algorithm="tropd", kl="k1", topk=4, baselines=BaselineConfig(tropd_prefix_fraction=0.5))
    config = tiny_run_config(models=dict(teacher_backend=backend), loss=guided)
    assert config.loss.tropd_guidance and config.teacher_engine
    assert config.colocated_teacher == (backend == "megatron") and config.remote_teacher == (backend == "vllm")
    plain = tiny_run_config(models=dict(teacher_backend=backend), loss=dict(algorithm="tropd", kl="k1", topk=4))
    assert not plain.loss.tropd_guidance and plain.teacher_engine == (backend == "vllm")


def test_exopd_reference_served_by_vllm_is_not_loaded_on_the_training_ranks():
    remote = tiny_run_config(models=dict(reference_backend="vllm"), loss=dict(algorithm="exopd"))
    assert remote.remote_reference and not remote.colocated_reference
    local = tiny_run_config(loss=dict(algorithm="exopd"))
    assert local.colocated_reference and not local.remote_reference
    assert not (tiny_run_config().colocated_reference or tiny_run_config().remote_reference)  # SCOPE reads none
    with pytest.raises(ValueError, match="--exopd-reference-backend name ExOPD's reference model; --scope-algorithm"):
        tiny_run_config(models=dict(reference_backend="vllm"))


def test_the_verifier_error_limit_is_a_fraction():
    assert build_config(build_parser().parse_args(REQUIRED)).data.max_verifier_error_fraction == 0.05
    with pytest.raises(ValueError, match=r"--max-verifier-error-fraction must lie in \[0, 1\], got 1.5"):
        build_config(build_parser().parse_args(REQUIRED + ["--max-verifier-error-fraction", "1.5"]))


def test_offloading_the_teacher_needs_one_on_the_training_gpus():
    assert tiny_run_config(rollout=dict(offload_teacher=True, offload_optimizer=True)).rollout.offload_teacher
    with pytest.raises(ValueError, match="--rl-offload-teacher-during-inference: --scope-algorithm grpo keeps no "
                                         "forward-only model on the training GPUs"):
        tiny_run_config(models=dict(teacher_hf=None), loss=dict(algorithm="grpo"), rollout=dict(offload_teacher=True))


def test_validation_samples_like_the_rollout_unless_told_and_reports_pass_at_powers_of_two():
    """--eval-temperature/--eval-top-p/--eval-max-new-tokens default to the rollout's; Pass@k is reported for the
    powers of two below n, and n; evaluation runs every --eval-interval iterations and after the last."""
    from megatron_scope.arguments import parse_run_config

    flags = REQUIRED + ["--rollout-temperature", "0.7", "--max-new-tokens", "99", "--eval-data", "heldout=h.jsonl",
                        "--eval-samples-per-prompt", "12", "--eval-interval", "4"]
    validation = parse_run_config(flags).validation
    assert (validation.temperature, validation.top_p, validation.max_new_tokens) == (0.7, 1.0, 99)
    assert validation.data == (("heldout", "h.jsonl"),) and validation.ks == (1, 2, 4, 8, 12)
    assert [i for i in range(1, 11) if validation.due(i, 10)] == [4, 8, 10]
    told = parse_run_config(flags + ["--eval-temperature", "0", "--eval-top-p", "0.9", "--eval-max-new-tokens", "5"])
    assert told.validation.sampling_params().temperature == 0 and told.validation.top_p == 0.9
    assert told.validation.max_new_tokens == 5 and parse_run_config(REQUIRED).validation.due(10, 10) is False
    assert parse_run_config(flags[:-6] + ["--eval-samples-per-prompt", "1"]).validation.ks == (1,)
