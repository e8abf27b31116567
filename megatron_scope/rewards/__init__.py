"""Verifiers that grade responses (the interface: rewards.base; math answers with math-verify; the synthetic task)."""

from megatron_scope.rewards.base import GoldAnswerError, PerAnswerVerifier, Verdict, Verifier
from megatron_scope.rewards.math_verifier import MathVerifier, extract_last_boxed, verify, verify_batch

__all__ = ["GoldAnswerError", "MathVerifier", "PerAnswerVerifier", "Verdict", "Verifier", "extract_last_boxed",
           "verify", "verify_batch"]
