"""Verifiers per data source (--reward-by-source SOURCE=VERIFIER, verl's `data_source`): each response is graded by
its prompt's source's verifier, every other one by --reward's.

A training prompt's source is its --data-source-key column; an --eval-data set's is its NAME. `build_verifier` gives
the run's verifier: the --reward one alone, or a `RoutedVerifier` over one instance of each verifier named.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from megatron_scope.rewards.base import Verdict, Verifier


def verifier_of_reward(reward: str, data) -> Verifier:
    """A new verifier of one --reward name (config.REWARDS) with `data`'s settings (a `config.DataConfig`: the custom
    function, the worker processes and their deadline)."""
    if reward in ("synthetic", "synthetic-strict"):
        from megatron_scope.rewards.synthetic import build_synthetic_verifier

        return build_synthetic_verifier(reward)
    if reward == "custom":
        from megatron_scope.rewards.custom import CustomVerifier

        return CustomVerifier(data.custom_reward_function, num_workers=data.verifier_workers,
                              timeout_seconds=data.verifier_timeout)
    if reward == "math":
        from megatron_scope.rewards.math_verifier import MathVerifier

        return MathVerifier(num_workers=data.verifier_workers, timeout_seconds=data.verifier_timeout)
    raise ValueError(f"unknown reward {reward!r}")


def build_verifier(data) -> Verifier:
    """The verifier of `data` (a `config.DataConfig`): --reward's, or with --reward-by-source a RoutedVerifier."""
    instances = {reward: verifier_of_reward(reward, data) for reward in data.rewards}
    if not data.reward_by_source:
        return instances[data.reward]
    return RoutedVerifier(instances[data.reward], {source: instances[reward] for source, reward in data.reward_by_source})


class RoutedVerifier(Verifier):
    """Grades each response with its data source's verifier (`by_source`), the others with `default`."""

    def __init__(self, default: Verifier, by_source: Mapping[str, Verifier]):
        self.default, self.by_source = default, dict(by_source)
        routes = ", ".join(f"{source}: {verifier.name}" for source, verifier in self.by_source.items())
        self.name = f"{default.name} ({routes})"
        self.statuses = tuple(dict.fromkeys(status for verifier in self._verifiers() for status in verifier.statuses))

    def _verifiers(self) -> list[Verifier]:
        """Each distinct verifier once, the default first."""
        return list({id(v): v for v in (self.default, *self.by_source.values())}.values())

    def of(self, source: str | None) -> Verifier:
        """The verifier of `source`'s responses."""
        return self.by_source.get(source, self.default)

    def check_gold_answers(self, gold_answers: Sequence[str], sources: Sequence[str | None] | None = None) -> None:
        for verifier, indices in self._route(len(gold_answers), sources):
            verifier.check_gold_answers([gold_answers[i] for i in indices])

    def judge_batch(self, response_texts: Sequence[str], gold_answers: Sequence[str],
                    sources: Sequence[str | None] | None = None) -> list[Verdict]:
        """A verdict per response, from its source's verifier (`sources[i]`; None: every response the default's)."""
        if len(response_texts) != len(gold_answers):
            raise ValueError(f"{len(response_texts)} responses but {len(gold_answers)} gold answers")
        verdicts: list[Verdict | None] = [None] * len(response_texts)
        for verifier, indices in self._route(len(response_texts), sources):
            for i, verdict in zip(indices, verifier.judge_batch([response_texts[i] for i in indices],
                                                                [gold_answers[i] for i in indices])):
                verdicts[i] = verdict
        return verdicts

    def _route(self, count: int, sources) -> list[tuple[Verifier, list[int]]]:
        if sources is None:
            sources = [None] * count
        if len(sources) != count:
            raise ValueError(f"{len(sources)} data sources for {count} responses")
        routes: dict[int, tuple[Verifier, list[int]]] = {}
        for i, source in enumerate(sources):
            verifier = self.of(source)
            routes.setdefault(id(verifier), (verifier, []))[1].append(i)
        return list(routes.values())

    def close(self) -> None:
        for verifier in self._verifiers():
            verifier.close()
