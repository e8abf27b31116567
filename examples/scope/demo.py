"""Embedded CPU demo (placeholder until the trainer lands): real Megatron at TP=2/PP=2 on 4 gloo ranks
must match the single-process model. `make demo` runs this; the trainer issue makes it the SCOPE demo."""

import sys

import pytest

if __name__ == "__main__":
    sys.exit(pytest.main(["-q", "-W", "ignore", "tests/distributed/test_megatron_smoke.py"]))
