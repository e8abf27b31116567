"""Shared by the ops tests."""

import pytest

from megatron_scope.ops import vocab_parallel


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch):
    """Eager kernels unless a test asks otherwise (the compiled path has its own test)."""
    monkeypatch.setenv(vocab_parallel.BACKEND_ENV, "eager")
