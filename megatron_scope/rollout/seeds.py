"""The seed of every random draw a run makes: a hash of what the draw is, never an offset sum.

vLLM gives each request its own generator, seeded with the request's seed, so two requests with one seed share their
sampling noise. An offset sum such as `seed + iteration + i G + j` makes draws that should be independent collide
(iteration t + 1's sample j is iteration t's sample j + 1; prompt i's last sample is prompt i + 1's first). Here a
draw is named by (run seed, iteration, the prompt's index in the step's batch, the sample's index in its group,
stream), where the stream says which draw it is, and its seed is a 63-bit hash of that name:

    seed = blake2b("run_seed/iteration/prompt/sample/stream")[:8] >> 1

A response generated in segments (partial rollouts) draws segment k >= 1 as a request of its own, named with
"/k" appended on the "resubmission" stream, so a continuation never replays an earlier segment's noise.

A pure function of the name, so runs are reproducible and a prompt gets the same samples on whichever engine and in
whichever call it is generated (placement-independent); distinct names collide with probability 2^-63 per pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

STREAMS = ("rollout", "teacher_prefix", "continuation", "evaluation", "resubmission")
"""rollout: a student's response; teacher_prefix: a teacher's response that TrOPD's guidance cuts into a prefix;
continuation: the student's continuation of such a prefix; evaluation: a sample for Avg@k / Pass@k; resubmission: a
later segment of a response generated in segments (`rollout.partial`), which continues the tokens drawn so far."""


def draw_seed(run_seed: int, iteration: int, prompt_index: int, sample_index: int, stream: str,
              segment: int = 0) -> int:
    """The seed of one draw (module docstring): a non-negative int below 2^63, which vLLM and torch both take;
    `segment` k >= 1 names a response's k-th continuation (the "resubmission" stream only)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; expected one of {STREAMS}")
    if segment < 0 or (segment > 0 and stream != "resubmission"):
        raise ValueError(f"segment {segment} of stream {stream!r}: segments k >= 1 of a response are drawn on the "
                         "resubmission stream")
    name = f"{int(run_seed)}/{int(iteration)}/{int(prompt_index)}/{int(sample_index)}/{stream}"
    name = (f"{name}/{int(segment)}" if segment else name).encode()
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") >> 1


@dataclasses.dataclass(frozen=True)
class StepSeeds:
    """The seeds of one iteration's draws of a run: `groups(indices, n, stream)[i][j]` is the seed of sample j of the
    step's prompt `indices[i]`."""

    run_seed: int
    """--seed."""
    iteration: int
    """The iteration (from 1); 0 outside training (tools/eval.py)."""

    def seed(self, prompt_index: int, sample_index: int, stream: str, segment: int = 0) -> int:
        return draw_seed(self.run_seed, self.iteration, prompt_index, sample_index, stream, segment)

    def groups(self, prompt_indices: Sequence[int], n: int, stream: str) -> list[list[int]]:
        """The seeds of samples 0 .. n - 1 of each prompt."""
        return [[self.seed(index, j, stream) for j in range(n)] for index in prompt_indices]
