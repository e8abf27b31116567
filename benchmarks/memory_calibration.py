"""Measured against estimated step memory on CPU, per configuration of tests/distributed/test_memory_calibration.py
(the test asserts each within 25%; this prints the pairs for BENCHMARKS.md).

    PYTHONPATH=. .venv/bin/python benchmarks/memory_calibration.py
"""

import os

os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned rank's glibc at start: freed tensors leave at once

from megatron_scope.testing.multiprocess import run_on_ranks  # noqa: E402
from tests.distributed import test_memory_calibration as calibration  # noqa: E402

if __name__ == "__main__":
    measured = run_on_ranks(calibration._measure, 1, timeout=900)[0]
    print("| configuration | measured MiB | estimated MiB | ratio |\n|---|---|---|---|")
    for name in calibration.CONFIGS:
        estimate = calibration._estimate(name)
        print(f"| {name} | {measured[name] / 2**20:.1f} | {estimate / 2**20:.1f} | {measured[name] / estimate:.2f} |")
