"""A teacher served elsewhere (--teacher-backend server): OpenAI-compatible vLLM servers (`vllm serve MODEL`, on
other nodes, as the SCOPE authors deploy their teacher), scored through the completions endpoint's prompt log-probs.

For a sequence x = prompt + response, one request item {"prompt": x (token ids), "max_tokens": 1, "prompt_logprobs":
k} returns, at every position t >= 1, a dict {token id: {"logprob", "rank"}} holding the given token x_t and the k
most likely next tokens: log π_T(x_t | x_<t) and the top-k of π_T(· | x_<t), the model's temperature-1 log-probs
(the server's default raw log-probs), what an in-process vLLM teacher's `score` / `score_topk` give. `ServedTeacher`
has those two methods, so `teacher.remote.score_responses` reads it as it reads an engine.

The step's sequences are cut into requests of `sequences_per_request` and spread over the servers (several base
URLs of one model: balanced, `max_in_flight` requests each at a time). A request that fails (connection refused or
reset, timeout, an HTTP error, an answer of the wrong shape) is retried up to `retries` times, on the next server
each time, after 1, 2, 4, ... s; when every try failed, `TeacherServerError` names the servers and the last error:
never a log-prob of 0 in place of an answer (the authors' released code's failure mode). The API key, if the
servers want one (`vllm serve --api-key`), comes from the environment variable TEACHER_API_KEY_ENV, never a flag.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import os
import threading
import time
from typing import Sequence

import torch

from megatron_scope.config import URL_SCHEMES

from megatron_scope.rollout.engine import SequenceScores

logger = logging.getLogger(__name__)

TEACHER_API_KEY_ENV = "SCOPE_TEACHER_API_KEY"
"""The environment variable holding the teacher servers' API key (sent as "Authorization: Bearer <key>")."""


class TeacherServerError(RuntimeError):
    """The teacher's servers gave no usable answer after every retry, or refused a request (HTTP 4xx: retrying
    cannot help)."""


class _Refused(Exception):
    """An HTTP 4xx answer: the request itself is wrong (e.g. more log-probs than the server's --max-logprobs)."""


@dataclasses.dataclass(frozen=True)
class ServedTeacherConfig:
    """Where the teacher is served and how it is asked."""

    urls: tuple[str, ...]
    """Base URLs of OpenAI-compatible vLLM servers of the same model, e.g. http://node7:8000 (a trailing /v1 is
    accepted)."""
    timeout_s: float = 600.0
    """--teacher-timeout: seconds one request may take (connect and answer)."""
    retries: int = 3
    """--teacher-retries: further tries of a failed request, each on the next server."""
    sequences_per_request: int = 16
    """Sequences per request (each request's prompt log-probs come back as one JSON document)."""
    max_in_flight: int = 4
    """Concurrent requests per server."""

    def __post_init__(self):
        if not self.urls:
            raise ValueError("--teacher-backend server needs the teacher's server URLs")
        for url in self.urls:
            if not url.startswith(URL_SCHEMES):
                raise ValueError(f"teacher server {url!r}: expected an http:// or https:// base URL")
        if self.timeout_s <= 0 or self.retries < 0 or self.sequences_per_request < 1 or self.max_in_flight < 1:
            raise ValueError(f"teacher servers: need timeout > 0, retries >= 0, sequences_per_request >= 1 and "
                             f"max_in_flight >= 1, got {self.timeout_s}, {self.retries}, {self.sequences_per_request} "
                             f"and {self.max_in_flight}")


def _base(url: str) -> str:
    """The server's /v1 root."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class ServedTeacher:
    """The teacher behind `config.urls`: `score` / `score_topk` as `rollout.vllm_engine.VLLMRolloutEngine`'s;
    `wake` / `sleep` do nothing (the servers' GPUs are their own)."""

    def __init__(self, config: ServedTeacherConfig):
        import requests

        self.config = config
        self._bases = [_base(url) for url in config.urls]
        self._session = requests.Session()
        key = os.environ.get(TEACHER_API_KEY_ENV)
        if key:
            self._session.headers["Authorization"] = f"Bearer {key}"
        self._next_server = itertools.count()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(len(self._bases) * config.max_in_flight,
                                                           thread_name_prefix="teacher-server")
        self.model, self.max_model_len = self._served_model()

    def _served_model(self) -> tuple[str, int | None]:
        """(model id, max_model_len) that every server reports at /v1/models: one model, the same everywhere (a
        server that is down or serves another model is an error now, before any rollout)."""
        served = {}
        for base in self._bases:
            models = self._with_retries(lambda b=base: self._get_json(b + "/models"), "GET /v1/models", [base])
            ids = [(entry["id"], entry.get("max_model_len")) for entry in models.get("data", [])]
            if len(ids) != 1:
                raise TeacherServerError(f"teacher server {base} serves {len(ids)} models ({[i for i, _ in ids]}); "
                                         "expected exactly one")
            served[base] = ids[0]
        if len(set(served.values())) != 1:
            raise TeacherServerError(f"the teacher servers serve different models: {served}")
        return next(iter(served.values()))

    # ---- the engine methods the trainer calls

    def score(self, sequences: Sequence[Sequence[int]], first: Sequence[int] | None = None) -> list[list[float]]:
        """Temperature-1 log-prob of each token from position `first[i]` on (default 1) given its prefix."""
        return [scores.log_probs.tolist() for scores in self._prompt_logprobs(sequences, 0, first)]

    def score_topk(self, sequences: Sequence[Sequence[int]], k: int,
                   first: Sequence[int] | None = None) -> list[SequenceScores]:
        """`score` plus, at each of those positions, the k most likely next tokens and their log-probs (the servers
        must allow k: `vllm serve --max-logprobs`)."""
        if k < 1:
            raise ValueError(f"score_topk: k={k} must be >= 1")
        return self._prompt_logprobs(sequences, k, first)

    def wake(self, tags=None) -> None:
        """Nothing to wake: the servers keep their own GPUs."""

    def sleep(self, level: int = 1) -> None:
        """Nothing to put to sleep."""

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()

    # ---- requests

    def _prompt_logprobs(self, sequences, k: int, first) -> list[SequenceScores]:
        sequences = [list(map(int, s)) for s in sequences]
        first = [1] * len(sequences) if first is None else [int(f) for f in first]
        if len(first) != len(sequences):
            raise ValueError(f"{len(first)} first positions for {len(sequences)} sequences")
        for index, (sequence, start) in enumerate(zip(sequences, first)):
            if not 1 <= start < len(sequence):
                raise ValueError(f"sequence {index} of {len(sequence)} token(s) has no position {start} to score")
            if self.max_model_len is not None and len(sequence) + 1 > self.max_model_len:
                raise ValueError(f"sequence {index} has {len(sequence)} tokens: with the one token a request samples "
                                 f"it exceeds the teacher server's max_model_len {self.max_model_len}")
        size = self.config.sequences_per_request
        chunks = [range(start, min(start + size, len(sequences))) for start in range(0, len(sequences), size)]
        futures = [self._pool.submit(self._request, [sequences[i] for i in chunk], k) for chunk in chunks]
        scores = []
        for chunk, future in zip(chunks, futures):
            for i, positions in zip(chunk, future.result()):
                scores.append(_scores_from_positions(sequences[i], positions, k, first[i], f"sequence {i}"))
        return scores

    def _request(self, sequences: list[list[int]], k: int) -> list[list]:
        """The prompt log-probs of each of `sequences` (one list per sequence, None at position 0)."""
        body = {"model": self.model, "prompt": sequences, "max_tokens": 1, "prompt_logprobs": k, "temperature": 1.0}

        def ask(base: str) -> list[list]:
            answer = self._post_json(base + "/completions", body)
            choices = sorted(answer.get("choices", []), key=lambda choice: choice["index"])
            if [c["index"] for c in choices] != list(range(len(sequences))):
                raise ValueError(f"{len(choices)} choices for {len(sequences)} prompts")
            logprobs = [choice.get("prompt_logprobs") for choice in choices]
            for sequence, positions in zip(sequences, logprobs):
                if positions is None or len(positions) != len(sequence):
                    raise ValueError(f"prompt log-probs of {0 if positions is None else len(positions)} positions for "
                                     f"a prompt of {len(sequence)} tokens")
            return logprobs

        return self._with_retries(ask, f"POST /v1/completions ({len(sequences)} sequences)")

    def _with_retries(self, call, what: str, bases: list[str] | None = None):
        """`call(base)` on the next server, then on the following ones, until it returns; TeacherServerError after
        1 + retries failures."""
        bases = bases or self._bases
        errors = []
        with self._lock:  # requests take the servers in turn; a request's retries go on from its own server
            start = next(self._next_server)
        for attempt in range(self.config.retries + 1):
            base = bases[(start + attempt) % len(bases)]
            try:
                return call(base)
            except _Refused as refusal:
                raise TeacherServerError(f"teacher server {base} refused {what}: {refusal}") from None
            except Exception as error:  # noqa: BLE001 - every failure is retried, then reported with its cause
                errors.append(f"{base}: {type(error).__name__}: {error}")
                if attempt < self.config.retries:
                    logger.warning("teacher server %s failed (%s: %s); retrying (%d of %d)", base,
                                   type(error).__name__, error, attempt + 1, self.config.retries)
                    time.sleep(min(2.0 ** attempt, 30.0))
        raise TeacherServerError(f"the teacher servers {bases} gave no answer to {what} after "
                                 f"{self.config.retries + 1} tries; the last error: {errors[-1]}")

    def _get_json(self, url: str) -> dict:
        response = self._session.get(url, timeout=self.config.timeout_s)
        response.raise_for_status()
        return response.json()

    def _post_json(self, url: str, body: dict) -> dict:
        response = self._session.post(url, json=body, timeout=self.config.timeout_s)
        if 400 <= response.status_code < 500:
            raise _Refused(f"HTTP {response.status_code}: {response.text[:500]}")
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        return response.json()


def _scores_from_positions(sequence: list[int], positions: list, k: int, first: int, where: str) -> SequenceScores:
    """Positions first .. len - 1 of a completions answer's prompt log-probs as tensors: the given token's log-prob
    and, with k > 0, the k most likely tokens in descending log-prob (the given token is among each position's
    entries, once, beside the top k)."""
    given, top_ids, top_values = [], [], []
    for t in range(first, len(sequence)):
        entries = {int(token): float(entry["logprob"]) for token, entry in (positions[t] or {}).items()}
        if sequence[t] not in entries:
            raise RuntimeError(f"{where}, position {t}: the teacher server's prompt log-probs lack the given token "
                               f"{sequence[t]}")
        given.append(entries[sequence[t]])
        if k:
            ranked = sorted(entries.items(), key=lambda item: -item[1])[:k]
            top_ids.append([token for token, _ in ranked])
            top_values.append([value for _, value in ranked])
    rows = len(given)
    return SequenceScores(torch.tensor(given, dtype=torch.float32),
                          torch.tensor(top_ids, dtype=torch.int32).reshape(rows, k),
                          torch.tensor(top_values, dtype=torch.float32).reshape(rows, k))
