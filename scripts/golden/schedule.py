"""Golden learning-rate sequences from transformers' schedulers (LambdaLR).

For each case: the warmup length that TrainingArguments.get_warmup_steps resolves
(a ratio becomes ceil(ratio * total_steps)), and the learning rate
scheduler.get_last_lr() reports before optimizer step 0, 1, ..., total_steps.
Our "constant" with warmup means transformers' "constant_with_warmup".

    .venv/bin/python scripts/golden/schedule.py   # writes tests/data/schedule/lr.json
"""
import json
import pathlib
import tempfile

import torch
import transformers
from transformers import TrainingArguments, get_scheduler

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "schedule"

# (schedule, total_steps, warmup_steps, warmup_ratio, base_lr)
CASES = [
    ("constant", 20, 0, 0.0, 2e-4),
    ("constant", 20, 5, 0.0, 2e-4),
    ("constant", 53, 0, 0.1, 3e-3),
    ("linear", 20, 0, 0.0, 2e-4),
    ("linear", 37, 7, 0.0, 2e-4),
    ("linear", 100, 0, 0.07, 1e-3),   # 100 * 0.07 = 7.000000000000001 -> 8 warmup steps
    ("linear", 100, 0, 0.03, 1e-3),   # 100 * 0.03 = 3.0 exactly -> 3
    ("linear", 5, 9, 0.0, 1e-3),      # warmup longer than the run
    ("cosine", 20, 0, 0.0, 2e-4),
    ("cosine", 1000, 30, 0.0, 2e-4),
    ("cosine", 333, 0, 0.05, 5e-5),
    ("cosine", 1, 0, 0.0, 1e-3),
]


def warmup_of(total, steps, ratio):
    # transformers 5 folds warmup_ratio into warmup_steps (a value < 1 is a ratio).
    with tempfile.TemporaryDirectory() as tmp:
        value = steps if steps > 0 else ratio
        args = TrainingArguments(output_dir=tmp, warmup_steps=value, report_to=[])
        return args.get_warmup_steps(total)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []
    for kind, total, steps, ratio, base_lr in CASES:
        warmup = warmup_of(total, steps, ratio)
        name = kind
        if kind == "constant" and warmup > 0:
            name = "constant_with_warmup"
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=base_lr)
        sched = get_scheduler(name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=total)
        lrs = []
        for _ in range(total + 1):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        cases.append(dict(schedule=kind, hf_name=name, total_steps=total, warmup_steps=steps,
                          warmup_ratio=ratio, resolved_warmup=warmup, base_lr=base_lr, lrs=lrs))
    doc = dict(generator="scripts/golden/schedule.py", transformers=transformers.__version__,
               torch=torch.__version__, cases=cases)
    path = OUT / "lr.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
