"""Measured against estimated step memory on CPU, per configuration of tests/distributed/test_memory_calibration.py
at TP = 1 and for some at TP = 2 (the test asserts them within 25%; this prints the pairs for BENCHMARKS.md).

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
    print("\n| TP = 2 configuration | measured MiB per rank | estimated MiB | ratios |\n|---|---|---|---|")
    for name, split in (("s2048-b1-unfused", False), ("s2048-b1-unfused", True), ("s2048-b1-selective-fused", False),
                        ("s2048-b1-selective-fused", True), ("s1024-b1-topk64", False)):
        ranks = run_on_ranks(calibration._measure, 2, args=((name,), split), timeout=900)
        estimate = calibration._estimate(name, tp=2, sequence_parallel=split)
        print(f"| {name}{' sequence-parallel' if split else ''} | {', '.join(f'{r[name] / 2**20:.1f}' for r in ranks)} "
              f"| {estimate / 2**20:.1f} | {', '.join(f'{r[name] / estimate:.2f}' for r in ranks)} |")
