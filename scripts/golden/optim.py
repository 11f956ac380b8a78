"""Golden optimizer runs: torch.optim.AdamW and bitsandbytes' 8-bit AdamW, 20 steps.

Inputs are not stored: parameters and gradients come from a counter-based generator
(splitmix64 -> a signed 24-bit fraction times a power of two, every value exact in
fp32) that tests/test_optim_*.cpp reimplement, so the golden files hold only results.
The learning rate changes every step (it is passed as data, as a schedule does).

Writes under tests/data/optim/:
  adamw.safetensors           torch.optim.AdamW (CPU single-tensor path) after 1 and 20 steps
  qmaps.safetensors           bitsandbytes create_dynamic_map(signed=True / False)
  adamw8bit_bnb_cpu.safetensors  bnb.optim.AdamW8bit run by bitsandbytes' CPU backend
  adamw8bit_kernel_ref.safetensors  a NumPy transcription of bnb's CUDA kernels
                              (kOptimizerStatic8bit2StateBlockwise, kOptimizer32bit2State);
                              see Note [bnb 8-bit AdamW semantics] in src/optim/adamw8bit_ref.cpp
  adamw8bit_bnb_cuda.safetensors  bnb.optim.AdamW8bit on a GPU (only with --cuda, on a GPU machine)
  meta.json                   hyper-parameters, shapes, versions

    .venv/bin/python scripts/golden/optim.py          # CPU goldens
    python scripts/golden/optim.py --cuda             # on a GPU machine: the CUDA golden only
"""
import argparse
import json
import pathlib

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "optim"

SHAPES = {"w_big": [33, 130], "w_even": [4096], "w_small": [25, 40]}  # 8-bit, 8-bit, fp32 state
STEPS = 20
BETA1, BETA2, EPS, WEIGHT_DECAY = 0.9, 0.999, 1e-8, 0.1
MIN_8BIT_SIZE = 4096
BLOCK = 256
M64 = (1 << 64) - 1


def lr_at(step):  # step 0-based; a warmup-like ramp that the test recomputes
    return 1e-3 * (step + 1) / STEPS


# ---------------------------------------------------------------- inputs

def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def exact_values(seed, n):
    """fp32 values (u - 2^23) * 2^-23 * 2^(e - 4), u 24 random bits, e 3 random bits."""
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        z = splitmix64(((seed << 32) ^ i) & M64)
        u = z >> 40
        e = (z >> 8) & 7
        out[i] = np.float32(np.ldexp(float(int(u) - (1 << 23)), int(e) - 4 - 23))
    return out


def init_params():
    return {name: exact_values(1000 + k, int(np.prod(shape))).reshape(shape)
            for k, (name, shape) in enumerate(SHAPES.items())}


def grad_at(step, k, shape):
    # per-step power-of-two scale so block absmax moves up and down
    g = exact_values(100 * (step + 1) + k, int(np.prod(shape))) * np.float32(2.0 ** (step % 3 - 1))
    return g.reshape(shape)


# ---------------------------------------------------------------- torch AdamW

def run_torch_adamw():
    params = {n: torch.nn.Parameter(torch.from_numpy(v.copy())) for n, v in init_params().items()}
    opt = torch.optim.AdamW(list(params.values()), lr=lr_at(0), betas=(BETA1, BETA2), eps=EPS,
                            weight_decay=WEIGHT_DECAY)
    out = {}
    for step in range(STEPS):
        for k, (n, p) in enumerate(params.items()):
            p.grad = torch.from_numpy(grad_at(step, k, SHAPES[n]))
        opt.param_groups[0]["lr"] = lr_at(step)
        opt.step()
        if step in (0, STEPS - 1):
            tag = f"step{step + 1}"
            for n, p in params.items():
                st = opt.state[p]
                out[f"{tag}.{n}.param"] = p.detach().clone()
                out[f"{tag}.{n}.exp_avg"] = st["exp_avg"].clone()
                out[f"{tag}.{n}.exp_avg_sq"] = st["exp_avg_sq"].clone()
    return out


# ---------------------------------------------------------------- bitsandbytes AdamW8bit

def run_bnb(device):
    import bitsandbytes as bnb
    params = {n: torch.nn.Parameter(torch.from_numpy(v.copy()).to(device)) for n, v in init_params().items()}
    opt = bnb.optim.AdamW8bit(list(params.values()), lr=lr_at(0), betas=(BETA1, BETA2), eps=EPS,
                              weight_decay=WEIGHT_DECAY, min_8bit_size=MIN_8BIT_SIZE)
    out = {}
    for step in range(STEPS):
        for k, (n, p) in enumerate(params.items()):
            p.grad = torch.from_numpy(grad_at(step, k, SHAPES[n])).to(device)
        opt.param_groups[0]["lr"] = lr_at(step)
        opt.step()
        if step in (0, STEPS - 1):
            out.update(bnb_state(opt, params, f"step{step + 1}"))
    return out


def bnb_state(opt, params, tag):
    out = {}
    for n, p in params.items():
        st = opt.state[p]
        out[f"{tag}.{n}.param"] = p.detach().cpu().clone()
        if st["state1"].dtype == torch.uint8:
            out[f"{tag}.{n}.exp_avg.q"] = st["state1"].cpu().clone()
            out[f"{tag}.{n}.exp_avg_sq.q"] = st["state2"].cpu().clone()
            out[f"{tag}.{n}.exp_avg.absmax"] = st["absmax1"].cpu().clone()
            out[f"{tag}.{n}.exp_avg_sq.absmax"] = st["absmax2"].cpu().clone()
        else:
            out[f"{tag}.{n}.exp_avg"] = st["state1"].cpu().clone()
            out[f"{tag}.{n}.exp_avg_sq"] = st["state2"].cpu().clone()
    return out


# ---------------------------------------------------------------- kernel transcription
# NumPy, fp32 throughout, one operation per line as the CUDA source writes it. Source:
# bitsandbytes csrc/kernels.cu at tag 0.50.1 (commit 37d2a938; the installed 0.50.2 has no
# tag in the repository, and kOptimizerStatic8bit2StateBlockwise is unchanged from 0.50.1
# to the current main). csrc/ops.cu launches it with BLOCK_SIZE 256, N_PER_TH 1 (one
# element a thread, one absmax block a CUDA block) and kOptimizer32bit2State for fp32 state
# with max_unorm 0 (update_scale 1). Line numbers below refer to that kernels.cu.
# The CUDA build contracts some a*b+c into FMAs and uses __powf / __fdividef; this
# transcription uses correctly rounded operations, as our C++ reference does (same results
# expected bit for bit against the C++; within a tolerance against the GPU).

f32 = np.float32


def quantize_2d(code, x, signed):
    """bnb quantize_2D: a 7-level binary search from the middle of the map, then the
    nearer neighbour by the fp32 midpoint (ties keep the searched pivot)."""
    n = x.shape[0]
    pivot = np.full(n, 127, dtype=np.int64)
    upper_pivot = np.full(n, 255, dtype=np.int64)
    lower_pivot = np.zeros(n, dtype=np.int64)
    lower = np.full(n, f32(-1.0) if signed else f32(0.0), dtype=np.float32)
    upper = np.full(n, f32(1.0), dtype=np.float32)
    val = np.full(n, code[127], dtype=np.float32)
    i = 64
    while i > 0:
        gt = x > val
        lower_pivot = np.where(gt, pivot, lower_pivot)
        lower = np.where(gt, val, lower)
        upper_pivot = np.where(gt, upper_pivot, pivot)
        upper = np.where(gt, upper, val)
        pivot = np.where(gt, pivot + i, pivot - i)
        val = code[pivot]
        i >>= 1
    gt = x > val
    mid_up = (upper + val) * f32(0.5)
    mid_lo = (lower + val) * f32(0.5)
    return np.where(gt, np.where(x > mid_up, upper_pivot, pivot),
                    np.where(x < mid_lo, lower_pivot, pivot)).astype(np.uint8)


def kernel_8bit_step(p, g, c1, c2, a1, a2, code1, code2, step, lr):
    n = p.shape[0]
    beta1, beta2, eps, wd, lr = f32(BETA1), f32(BETA2), f32(EPS), f32(WEIGHT_DECAY), f32(lr)
    correction1 = f32(1.0) - np.power(beta1, f32(step))               # 932 (__powf)
    correction2 = np.sqrt(f32(1.0) - np.power(beta2, f32(step)))      # 933
    step_size = (-lr * correction2) / correction1                     # 934 (__fdividef)
    blocks = (n + BLOCK - 1) // BLOCK
    pad = blocks * BLOCK - n
    # padding lanes of the last block load g = 0, code1 = 128, code2 = 0 (996-1002)
    gp = np.concatenate([g, np.zeros(pad, np.float32)])
    c1p = np.concatenate([c1, np.full(pad, 128, np.uint8)])
    c2p = np.concatenate([c2, np.zeros(pad, np.uint8)])
    blk = np.arange(blocks * BLOCK) // BLOCK
    finite = np.isfinite(gp)                                          # 1021
    s2 = code2[c2p] * a2[blk]
    s2 = (s2 * beta2) + (((f32(1.0) - beta2) * gp) * gp)              # 1022-1024
    s1 = code1[c1p] * a1[blk]
    s1 = (s1 * beta1) + ((f32(1.0) - beta1) * gp)                     # 1026-1027
    s1 = np.where(finite, s1, f32(0.0)).astype(np.float32)            # 1034-1036
    s2 = np.where(finite, s2, f32(0.0)).astype(np.float32)
    new_a1 = np.abs(s1).reshape(blocks, BLOCK).max(axis=1).astype(np.float32)  # 1043-1077 block max
    new_a2 = np.abs(s2).reshape(blocks, BLOCK).max(axis=1).astype(np.float32)
    s1v, s2v = s1[:n], s2[:n]
    upd = step_size * (s1v / (np.sqrt(s2v) + (correction2 * eps)))   # 1098-1100 (__fdividef)
    newp = p + upd
    if wd > 0:
        newp = newp * (f32(1.0) - (lr * wd))                          # 1103-1104: decay after
    newp = np.where(finite[:n], newp, p).astype(np.float32)
    q1 = quantize_2d(code1, s1v / new_a1[blk[:n]], True)              # 1115 (quantize_2D, 222-261)
    q2 = quantize_2d(code2, s2v / new_a2[blk[:n]], False)             # 1116
    # keep the sign of the first moment: step one code towards it when the map lost it (1120-1125)
    lost = np.signbit(code1[q1]) != np.signbit(s1v)
    q1 = np.where(lost, np.where(s1v > 0, q1.astype(np.int64) + 1, q1.astype(np.int64) - 1), q1)
    return newp, (q1 & 0xFF).astype(np.uint8), q2, new_a1, new_a2


def kernel_32bit_step(p, g, m, v, step, lr):
    beta1, beta2, eps, wd, lr = f32(BETA1), f32(BETA2), f32(EPS), f32(WEIGHT_DECAY), f32(lr)
    correction1 = f32(1.0) - np.power(beta1, f32(step))
    correction2 = np.sqrt(f32(1.0) - np.power(beta2, f32(step)))
    step_size = -lr * correction2 / correction1
    m = m * beta1 + ((f32(1.0) - beta1) * g)                          # 703
    v = v * beta2 + ((f32(1.0) - beta2) * (g * g))                    # 704
    p = p + (f32(1.0) * step_size * (m / (np.sqrt(v) + (eps * correction2))))
    if wd > 0:
        p = p * (f32(1.0) - (lr * wd))                                # 708-709
    return p.astype(np.float32), m.astype(np.float32), v.astype(np.float32)


def run_kernel_ref(code1, code2):
    params = {n: v.reshape(-1).copy() for n, v in init_params().items()}
    state = {}
    for n, p in params.items():
        if p.size >= MIN_8BIT_SIZE:
            blocks = (p.size + BLOCK - 1) // BLOCK
            state[n] = [np.zeros(p.size, np.uint8), np.zeros(p.size, np.uint8),
                        np.zeros(blocks, np.float32), np.zeros(blocks, np.float32)]
        else:
            state[n] = [np.zeros(p.size, np.float32), np.zeros(p.size, np.float32)]
    out = {}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for step in range(STEPS):
            for k, n in enumerate(params):
                g = grad_at(step, k, SHAPES[n]).reshape(-1)
                st = state[n]
                if len(st) == 4:
                    params[n], st[0], st[1], st[2], st[3] = kernel_8bit_step(
                        params[n], g, st[0], st[1], st[2], st[3], code1, code2, step + 1, lr_at(step))
                else:
                    params[n], st[0], st[1] = kernel_32bit_step(params[n], g, st[0], st[1], step + 1, lr_at(step))
            if step in (0, STEPS - 1):
                tag = f"step{step + 1}"
                for n, p in params.items():
                    st = state[n]
                    out[f"{tag}.{n}.param"] = torch.from_numpy(p.reshape(SHAPES[n]).copy())
                    if len(st) == 4:
                        out[f"{tag}.{n}.exp_avg.q"] = torch.from_numpy(st[0].reshape(SHAPES[n]).copy())
                        out[f"{tag}.{n}.exp_avg_sq.q"] = torch.from_numpy(st[1].reshape(SHAPES[n]).copy())
                        out[f"{tag}.{n}.exp_avg.absmax"] = torch.from_numpy(st[2].copy())
                        out[f"{tag}.{n}.exp_avg_sq.absmax"] = torch.from_numpy(st[3].copy())
                    else:
                        out[f"{tag}.{n}.exp_avg"] = torch.from_numpy(st[0].reshape(SHAPES[n]).copy())
                        out[f"{tag}.{n}.exp_avg_sq"] = torch.from_numpy(st[1].reshape(SHAPES[n]).copy())
    return out


def save(name, tensors):
    from safetensors.torch import save_file
    path = OUT / name
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path))
    print(f"wrote {path.relative_to(ROOT)} ({len(tensors)} tensors, {path.stat().st_size} bytes)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true", help="write only the GPU golden (needs a GPU and bnb)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.cuda:
        save("adamw8bit_bnb_cuda.safetensors", run_bnb("cuda"))
        return
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    code1 = F.create_dynamic_map(signed=True)
    code2 = F.create_dynamic_map(signed=False)
    save("qmaps.safetensors", {"signed": code1, "unsigned": code2})
    save("adamw.safetensors", run_torch_adamw())
    save("adamw8bit_bnb_cpu.safetensors", run_bnb("cpu"))
    save("adamw8bit_kernel_ref.safetensors", run_kernel_ref(code1.numpy(), code2.numpy()))
    first = exact_values(1000, 4)
    meta = dict(generator="scripts/golden/optim.py", torch=torch.__version__, bitsandbytes=bnb.__version__,
                shapes=SHAPES, steps=STEPS, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WEIGHT_DECAY,
                min_8bit_size=MIN_8BIT_SIZE, block=BLOCK, lr=[lr_at(s) for s in range(STEPS)],
                first_values_seed_1000=[float(x) for x in first])
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {(OUT / 'meta.json').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
