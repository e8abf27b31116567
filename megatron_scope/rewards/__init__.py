"""Verifiers that grade responses (math answers with math-verify)."""

from megatron_scope.rewards.math_verifier import (
    GoldAnswerError,
    MathVerifier,
    Verdict,
    extract_last_boxed,
    verify,
    verify_batch,
)

__all__ = ["GoldAnswerError", "MathVerifier", "Verdict", "extract_last_boxed", "verify", "verify_batch"]
