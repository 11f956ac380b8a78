"""Golden loss-scale sequences from PyTorch's own GradScaler (CPU device).

A one-tensor model is trained with SGD under torch.amp.GradScaler("cpu"); at
chosen steps an inf or a nan is written into the gradient (or the loss is made
inf). For every step we record the scale used, whether the optimizer step ran
and the scale after update(). Runs: growth_interval 3
(reaches the fp32 ceiling, where GradScaler stops growing) and the default 2000.
A short run with init_scale 3.0 (not a power of two) records scaled and
unscaled gradients, to pin the unscale arithmetic bit for bit.

    .venv/bin/python scripts/golden/amp.py   # writes tests/data/amp/scaler.json
"""
import json
import math
import pathlib
import random

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "amp"


def bad_steps(n, seed):
    rng = random.Random(seed)
    bad = {}
    # Bursts, isolated hits, and a random 3 % sprinkle.
    for s in [0, 1, 2, 10, 11, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]:
        bad[s] = "inf"
    for s in range(n):
        if rng.random() < 0.03:
            bad[s] = rng.choice(["inf", "nan", "-inf", "loss_inf"])
    # a long clean stretch in the middle so the 2000-step interval can grow
    for s in list(bad):
        if 1000 <= s < 4400:
            del bad[s]
    return {s: k for s, k in sorted(bad.items()) if s < n}


def json_floats(t):
    """Floats for strict JSON: non-finite values as the strings "nan", "inf", "-inf"."""
    return [x if math.isfinite(x) else str(x) for x in t.tolist()]


class CountingSGD(torch.optim.SGD):
    """SGD that counts how often GradScaler let its step() run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def step(self, closure=None):
        self.calls += 1
        return super().step(closure)


def run(n, growth_interval, init_scale, seed, record_grads=0, loss_factor=1e-30):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(8))
    opt = CountingSGD([w], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_factor=2.0,
                                  backoff_factor=0.5, growth_interval=growth_interval)
    bad = bad_steps(n, seed)
    scale_used, skipped, scale_after, grads = [], [], [], []
    for step in range(n):
        x = torch.randn(8)
        opt.zero_grad(set_to_none=True)
        # loss_factor keeps the scaled loss finite even at the fp32 ceiling of the
        # scale, so only the injected values make a step non-finite.
        loss = (w * x).sum() ** 2 * loss_factor
        kind = bad.get(step)
        if kind == "loss_inf":
            loss = loss * float("inf")
        scale_used.append(scaler.get_scale())
        scaler.scale(loss).backward()
        if kind in ("inf", "nan", "-inf"):
            with torch.no_grad():
                w.grad[step % 8] = float(kind)
        scaled = w.grad.clone()
        scaler.unscale_(opt)
        if step < record_grads:
            grads.append(dict(scaled=json_floats(scaled), unscaled=json_floats(w.grad)))
        calls = opt.calls
        scaler.step(opt)
        scaler.update()
        skipped.append(opt.calls == calls)
        scale_after.append(scaler.get_scale())
    return dict(steps=n, growth_interval=growth_interval, init_scale=init_scale,
                growth_factor=2.0, backoff_factor=0.5,
                bad_steps={str(k): v for k, v in bad.items()},
                scale_used=scale_used, skipped=skipped, scale_after=scale_after, grads=grads)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    runs = [run(5000, 3, 2.0 ** 16, 1), run(5000, 2000, 2.0 ** 16, 2),
            run(12, 2, 3.0, 3, record_grads=12, loss_factor=1.0)]
    for r in runs:
        skipped = [i for i, s in enumerate(r["skipped"]) if s]
        assert all(str(i) in r["bad_steps"] for i in skipped), "a clean step was skipped"
        missed = [k for k in r["bad_steps"] if not r["skipped"][int(k)]]
        assert not missed, f"bad steps not skipped: {missed} {[r['bad_steps'][k] for k in missed]}"
    doc = dict(generator="scripts/golden/amp.py", torch=torch.__version__, runs=runs)
    path = OUT / "scaler.json"
    path.write_text(json.dumps(doc, allow_nan=False) + "\n")
    print(f"wrote {path.relative_to(ROOT)}: " + ", ".join(
        f"{r['steps']} steps interval {r['growth_interval']} ({sum(r['skipped'])} skipped, "
        f"max scale {max(r['scale_after'])})" for r in runs))


if __name__ == "__main__":
    main()
