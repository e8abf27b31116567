"""Math verifier throughput against --verifier-workers: answers graded per second, side by side in one run.

    python benchmarks/bench_verifier.py [--answers 2048] [--workers 1 2] [--rounds 3]

The answers are the shapes a math run grades (integers, fractions against decimals, radicals, intervals, wrong and
unboxed answers), each against its gold, through `MathVerifier.judge_batch` (worker processes with a deadline per
answer, `rewards/workers.py`); the workers start before timing (a warm-up batch). Prints a markdown row per worker
count: the median seconds of a batch and answers per second, and the ratio to one worker.
"""

from __future__ import annotations

import argparse
import statistics
import time

# (response, gold): correct, equivalent in another form, wrong, unboxed
SHAPES = [
    ("The answer is \\boxed{156}.", "156"),
    ("So \\boxed{0.75}", "\\frac{3}{4}"),
    ("We get \\boxed{5\\sqrt{2}}", "5\\sqrt{2}"),
    ("Hence \\boxed{[1, \\infty)}", "[1,\\infty)"),
    ("Thus \\boxed{\\frac{6}{7}}", "\\frac{3}{4}"),
    ("The roots are \\boxed{-2, 2}", "2,-2"),
    ("It is 42.", "42"),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2"),
]


def main(argv=None) -> None:
    from megatron_scope.rewards.math_verifier import MathVerifier

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=int, default=2048, help="answers per batch (the paper's step: 256 x 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    pairs = [SHAPES[i % len(SHAPES)] for i in range(args.answers)]
    texts, golds = [p[0] for p in pairs], [p[1] for p in pairs]
    print(f"| workers | seconds per {args.answers} answers (median of {args.rounds}) | answers/s | speed-up |")
    print("|---|---|---|---|")
    base = None
    for workers in args.workers:
        with MathVerifier(num_workers=workers) as verifier:
            verifier.judge_batch(texts[:64], golds[:64])  # start the workers
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                verdicts = verifier.judge_batch(texts, golds)
                times.append(time.perf_counter() - start)
            assert len(verdicts) == len(texts)
        seconds = statistics.median(times)
        base = base or seconds
        print(f"| {workers} | {seconds:.2f} | {args.answers / seconds:.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
