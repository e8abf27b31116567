"""Can a student serve as SRPO's self-teacher? Its view of a response under the plain prompt and under the re-prompt.

SRPO/SDPO's self-teacher is the student re-prompted with a successful sibling; it helps only if the model reads the
demonstration in context. This measures that on the demo's models (plain transformers, the project's tokenizer and
--srpo-reprompt-template), for N training problems:

- the gold solution's mean token log-prob under the plain prompt (the student) and under the re-prompt whose
  demonstration IS that gold solution (a model that reads its context can copy it: near 0);
- the same for a failed response (the gold working with a wrong final answer), and KL(student ‖ self-teacher) and
  both entropies at its tokens: what SRPO's loss would distil.

    python benchmarks/self_teacher_quality.py --workdir outputs/demo [--template "{prompt} {solution} ; {prompt}"]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "scope"))

import demo  # noqa: E402

from megatron_scope.data.datasets import PromptFormat  # noqa: E402
from megatron_scope.data.tokenizer import Tokenizer  # noqa: E402
from megatron_scope.teacher.self_teacher import reprompt_builder  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/demo")
    parser.add_argument("--template", default=demo.SRPO_REPROMPT_TEMPLATE)
    parser.add_argument("--model", default="student_hf", help="Model directory under --workdir.")
    parser.add_argument("--n", type=int, default=200, help="Training problems (the first N).")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    tokenizer = Tokenizer.load(f"{args.workdir}/tokenizer.model")
    model = AutoModelForCausalLM.from_pretrained(f"{args.workdir}/{args.model}", torch_dtype=torch.float32).eval()
    build = reprompt_builder(tokenizer, PromptFormat(), args.template)
    with open(f"{args.workdir}/task/train.jsonl") as handle:
        rows = [json.loads(line) for line in handle][: args.n]

    def view(prompt_ids, response_ids):
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(response_ids)]
        return logits.double().log_softmax(-1)

    totals = {}
    for row in rows:
        plain, reprompt = tokenizer.encode(row["prompt"], add_bos=True), build(row["prompt"], row["solution"])
        gold = tokenizer.encode(row["solution"]) + [tokenizer.eos_id]
        wrong_text = row["solution"].rsplit("A: ", 1)[0] + f"A: {int(row['answer']) + 1}"
        wrong = tokenizer.encode(wrong_text) + [tokenizer.eos_id]
        for name, response in (("gold", gold), ("failed", wrong)):
            student, teacher = view(plain, response), view(reprompt, response)
            index = torch.tensor(response)[:, None]
            values = {
                f"{name}/student_log_prob": student.gather(-1, index).mean(),
                f"{name}/self_teacher_log_prob": teacher.gather(-1, index).mean(),
                f"{name}/student_entropy": -(student.exp() * student).sum(-1).mean(),
                f"{name}/self_teacher_entropy": -(teacher.exp() * teacher).sum(-1).mean(),
                f"{name}/kl_student_to_self_teacher": (student.exp() * (student - teacher)).sum(-1).mean(),
            }
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + float(value) / len(rows)
    print(json.dumps({"workdir": args.workdir, "model": args.model, "template": args.template, "n": len(rows),
                      **{k: round(v, 4) for k, v in totals.items()}}, indent=1))


if __name__ == "__main__":
    main()
