"""PROPS at a fixed checkpoint: sampling error and the variance of the gradient estimate, i.i.d. against PROPS.

For each method (SCOPE, OPD, GRPO) one trainer on the demo's student (`make demo` first) draws R rollouts of the same
P prompts (R seeds), each with G samples per prompt by each sampler, and computes the step's gradient on each rollout
without moving the weights (learning rate 1e-30, no clipping): the spread of those R gradients around their mean is
the variance of the gradient estimate the sampler gives (with its standard error over the R rollouts); the step's
`rollout/sampling_error` (PROPS's measure, at the shared prefixes) and `rollout/shared_prefix_fraction` are averaged
over the R rollouts. Every sampler sees the same prompts and seeds, so round 1 of PROPS draws what i.i.d. draws.

    python examples/scope/props_study.py --workdir outputs/demo --out outputs/demo/props-variance

Writes <out>/results.json and results.md. The held-out accuracy of training with each sampler is compare.py's
(`*-props` methods).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics

import torch

import demo

SAMPLERS = {"iid": None, "props r=2": (2, None), "props r=G": ("G", None), "props r=G ε=0.9": ("G", 0.9)}
"""The samplers compared: name -> PROPS (rounds, ε) (None: i.i.d.; ε None: --props-clip)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/demo", help="A finished `make demo` directory.")
    parser.add_argument("--out", default=None, help="Default: <workdir>/props-variance.")
    parser.add_argument("--methods", nargs="+", default=["scope", "opd", "grpo"])
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--prompts", type=int, default=16, help="P, the prompts of every rollout.")
    parser.add_argument("--rollouts", type=int, default=16, help="R, the rollouts (seeds) per setting.")
    parser.add_argument("--props-clip", type=float, default=0.3)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def gradient(trainer) -> torch.Tensor:
    """The step's gradient over every parameter of the student, as one float64 vector (Megatron's main_grad)."""
    return torch.cat([(p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).detach().double().flatten()
                      for p in trainer.student.parameters() if p.requires_grad])


def measure(args, method: str) -> list[dict]:
    """Every (G, sampler) setting of one method on one trainer (the configuration is switched between settings)."""
    from megatron_scope.arguments import parse_run_config
    from megatron_scope.rollout.props import PropsSampling
    from megatron_scope.train import build_trainer

    largest = max(args.group_sizes)
    flags = demo.distillation_flags(args.workdir, method, args.seed, 100 * args.rollouts, args.prompts, largest,
                                    args.max_new_tokens, 1e-30,
                                    extra=["--clip-grad", "0", "--micro-batch-size", "16", "--rollout-sampler",
                                           "props", "--props-rounds", "2", "--props-clip", str(args.props_clip)],
                                    reward="synthetic-strict")
    trainer = build_trainer(parse_run_config(flags))
    prompts = trainer.dataset.next_batch(args.prompts)
    rows = []
    try:
        for group_size in args.group_sizes:
            for sampler, setting in SAMPLERS.items():
                props = None
                if setting is not None:
                    rounds, clip = setting
                    if rounds == "G" and group_size == 2 and clip is None:
                        continue  # r = G is r = 2 at G = 2
                    props = PropsSampling(group_size if rounds == "G" else rounds, clip or args.props_clip)
                rollout = dataclasses.replace(trainer.config.rollout, group_size=group_size, props=props)
                trainer.config = dataclasses.replace(trainer.config, rollout=rollout)
                grads, errors, shared = [], [], []
                for r in range(args.rollouts):
                    trainer.sync_weights()  # the student's (unmoved) weights into the engine, asleep since the last
                    groups, _ = trainer._sample_verify_score(prompts, 0, r + 1, 0)
                    metrics = {}
                    trainer.learn(groups, metrics)
                    grads.append(gradient(trainer))
                    errors.append(metrics["rollout/sampling_error"])
                    shared.append(metrics["rollout/shared_prefix_fraction"])
                stacked = torch.stack(grads)
                mean = stacked.mean(0)
                deviations = ((stacked - mean) ** 2).sum(1) * len(grads) / (len(grads) - 1)  # unbiased E||g - ḡ||²
                rows.append({"method": method, "G": group_size, "sampler": sampler,
                             "sampling_error": statistics.mean(errors),
                             "sampling_error_se": statistics.stdev(errors) / len(errors) ** 0.5,
                             "shared_fraction": statistics.mean(shared),
                             "grad_variance": deviations.mean().item(),
                             "grad_variance_se": deviations.std().item() / len(grads) ** 0.5,
                             "grad_mean_sq_norm": float(mean @ mean)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        trainer.close()
    return rows


def table(rows: list[dict]) -> str:
    """One line per (method, G): each sampler's sampling error and gradient variance, relative to i.i.d.'s."""
    lines = ["| method | G | sampler | sampling error ± s.e. | shared-prefix tokens | "
             "gradient variance E‖g - ḡ‖² ± s.e. | variance / i.i.d. |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        iid = next(r for r in rows if (r["method"], r["G"], r["sampler"]) == (row["method"], row["G"], "iid"))
        lines.append(f"| {row['method']} | {row['G']} | {row['sampler']} | {row['sampling_error']:.4f} ± "
                     f"{row['sampling_error_se']:.4f} | {row['shared_fraction']:.3f} | {row['grad_variance']:.3f} ± "
                     f"{row['grad_variance_se']:.3f} | {row['grad_variance'] / iid['grad_variance']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = args.out or os.path.join(args.workdir, "props-variance")
    os.makedirs(out, exist_ok=True)
    rows = [row for method in args.methods for row in measure(args, method)]
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump({"args": vars(args), "rows": rows}, handle, indent=1)
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
