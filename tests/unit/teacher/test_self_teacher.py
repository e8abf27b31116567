"""SRPO's self-teacher: the re-prompt text and ids, and which failed responses are routed to it."""

import logging
import types

import pytest

from megatron_scope.config import SRPO_REPROMPT_TEMPLATE, BaselineConfig
from megatron_scope.data.datasets import Prompt, PromptFormat
from megatron_scope.teacher.self_teacher import reprompt_builder, reprompt_text, route_group
from megatron_scope.testing.tiny import tiny_run_config
from megatron_scope.trainer import ScopeTrainer


class CharTokenizer:
    """One id per character (BOS = 1): enough to read the ids back as text; like a real tokenizer, it refuses
    characters it lacks (here: newlines)."""

    def encode(self, text, add_bos=False):
        if "\n" in text:
            raise ValueError(f"cannot encode characters ['\\n'] of {text!r}")
        return ([1] if add_bos else []) + [ord(c) for c in text]


def decode(ids):
    return "".join(chr(i) for i in ids[1:])


def test_reprompt_is_sdpos_template_filled_literally_in_one_pass():
    assert reprompt_text(SRPO_REPROMPT_TEMPLATE, "What is 2+3?", "2+3=5 ; A: 5") == (
        "What is 2+3?\nCorrect solution:\n\n2+3=5 ; A: 5\n\nCorrectly solve the original question.")
    # braces in the texts are kept, and a {prompt} inside the solution is not substituted again
    assert reprompt_text("{solution}|{prompt}", "x {solution}", "\\boxed{4} {prompt}") == "\\boxed{4} {prompt}|x {solution}"


def test_reprompt_ids_format_the_templated_prompt_like_a_rollout_prompt():
    build = reprompt_builder(CharTokenizer(), PromptFormat("Q: {prompt} A:"), "[{prompt}] solved as ({solution})")
    ids = build("1+1", "2")
    assert ids[0] == 1 and decode(ids) == "[Q: 1+1 A:] solved as (2)"


def test_a_failed_response_is_distilled_toward_the_groups_first_success():
    build = reprompt_builder(CharTokenizer(), PromptFormat(), "{prompt}|{solution}")
    responses = [[5] * 3, [6] * 4, [7] * 2, [8] * 5]
    texts = ["wrong a", "right b", "wrong c", "right d"]
    routes = route_group("p", responses, texts, [False, True, False, True], build, context=100)
    assert routes[1] is None and routes[3] is None  # correct responses: GRPO
    assert decode(routes[0]) == decode(routes[2]) == "p|right b"  # the first success, never the response itself


def test_groups_without_a_success_or_a_failure_are_not_distilled():
    build = reprompt_builder(CharTokenizer(), PromptFormat(), "{prompt}|{solution}")
    for correct in ([False, False], [True, True]):
        assert route_group("p", [[5], [6]], ["a", "b"], correct, build, context=100) == [None, None]


def test_a_reprompt_that_does_not_fit_the_context_goes_to_grpo():
    build = reprompt_builder(CharTokenizer(), PromptFormat(), "{prompt}|{solution}")
    ids_length = len(build("p", "right"))  # BOS + "p|right" = 8
    responses = [[5] * 4, [6] * 5, [7]]
    routes = route_group("p", responses, ["w", "w", "right"], [False, False, True], build,
                         context=ids_length + 4 - 1)  # the model reads prompt + response - 1 positions
    assert routes[0] is not None and routes[1] is None and routes[2] is None


def _setup(template, context=64, max_new_tokens=8):
    config = tiny_run_config(models=dict(teacher_hf=None), rollout=dict(group_size=2, max_new_tokens=max_new_tokens),
                             loss=dict(algorithm="srpo", baselines=BaselineConfig(srpo_reprompt_template=template)))
    trainer = types.SimpleNamespace(config=config, arch=types.SimpleNamespace(max_position_embeddings=context),
                                    dataset=types.SimpleNamespace(prompts=[Prompt("p0", "1+1=", "2"),
                                                                           Prompt("p1", "12+30=", "42")]),
                                    build_reprompt=reprompt_builder(CharTokenizer(), PromptFormat(), template))
    return lambda: ScopeTrainer._check_reprompts(trainer)


def test_a_template_the_tokenizer_cannot_encode_is_refused_before_training():
    with pytest.raises(ValueError, match=r"--srpo-reprompt-template .* for prompt 'p0': cannot encode"):
        _setup(SRPO_REPROMPT_TEMPLATE)()  # SDPO's English template has newlines


def test_a_reprompt_without_room_for_two_responses_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_scope.trainer"):
        _setup("{prompt} {solution} ; {prompt}", context=64, max_new_tokens=8)()
        assert not caplog.records
        # the longest re-prompt: BOS + "12+30=  ; 12+30=" = 17 tokens, 64 - 17 = 47 < 2 x 24
        _setup("{prompt} {solution} ; {prompt}", context=64, max_new_tokens=24)()
    assert "leaves 47 of 64 positions" in caplog.text
