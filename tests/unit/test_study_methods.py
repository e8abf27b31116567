"""The mini study's methods (examples/scope/compare.py STUDY_METHODS) are valid runs that differ from their
algorithm's default exactly as named."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "scope"))
import compare  # noqa: E402
import demo  # noqa: E402

from megatron_scope.arguments import parse_run_config  # noqa: E402


def _config(method):
    algorithm, extra = compare.STUDY_METHODS[method]
    return parse_run_config(demo.distillation_flags("w", algorithm, 0, 10, 8, 2, 16, 5e-4, extra=extra))


@pytest.mark.parametrize("method", sorted(compare.STUDY_METHODS))
def test_every_method_parses(method):
    assert _config(method).loss.algorithm == compare.STUDY_METHODS[method][0]


def test_variants_change_what_their_names_say():
    paper, released = _config("scope"), _config("scope-released")
    assert (paper.loss.kl, paper.loss.student_path_exponent, paper.optimizer.lr_decay_style) == ("reverse", 1, "cosine")
    assert (released.loss.kl, released.loss.teacher_path_loss, released.loss.student_path_exponent,
            released.loss.loss_agg_mode, released.loss.logprob_temperature, released.rollout.temperature,
            released.optimizer.lr_decay_style, released.optimizer.weight_decay) == \
        ("k1", "ppo", -1, "scope-released", 0.6, 0.6, "constant", 0.01)
    assert not _config("scope-no-student-weights").loss.student_path_weights
    assert not _config("scope-no-mle").loss.student_path and _config("scope-no-mle").loss.student_path_weights
    assert (_config("opd-k1").loss.algorithm, _config("opd-k1").loss.kl) == ("opd", "k1")
    guided, tropd = _config("tropd-guided"), _config("tropd")
    assert guided.loss.tropd_guidance and guided.teacher_engine and not tropd.loss.tropd_guidance
    assert guided.loss.kl == tropd.loss.kl
    masked = _config("tropd-mask")
    assert (tropd.loss.baselines.tropd_outlier, masked.loss.baselines.tropd_outlier) == ("forward", "mask")


def test_srpo_runs_with_its_self_teacher_unless_told_external():
    srpo, current, external = _config("srpo"), _config("srpo-current"), _config("srpo-external")
    assert (srpo.loss.baselines.srpo_teacher, srpo.models.teacher_hf) == ("ema", None)
    assert (current.loss.baselines.srpo_teacher, current.models.teacher_hf) == ("current", None)
    assert (external.loss.baselines.srpo_teacher, external.models.teacher_hf) == ("external", "w/teacher_hf")


def test_props_methods_draw_one_sample_per_round():
    algorithm, extra = compare.STUDY_METHODS["grpo-props"]
    config = parse_run_config(demo.distillation_flags("w", algorithm, 0, 10, 8, 4, 16, 5e-4,
                                                      extra=[*extra, *compare.props_rounds(extra, 4)]))
    assert (config.loss.algorithm, config.rollout.props.rounds, config.rollout.props.clip) == ("grpo", 4, 0.3)
    assert compare.props_rounds(compare.STUDY_METHODS["grpo"][1], 4) == [] and _config("grpo").rollout.props is None
