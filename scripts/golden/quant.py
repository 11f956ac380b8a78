#!/usr/bin/env python3
"""Golden data for the quant module: NF4 (+ double quantization) and Linear4bit from bitsandbytes.

Run:  .venv/bin/python scripts/golden/quant.py
Writes tests/data/quant/quant.bin (all arrays, little-endian, back to back) and
tests/data/quant/index.txt (one array a line: `name dtype offset nbytes dim0 dim1 ...`),
read by tests/test_quant_nf4.cpp and tests/test_quant_linear4bit.cpp.

Oracle: bitsandbytes (CPU backend) quantize_4bit / dequantize_4bit / quantize_blockwise /
matmul_4bit with quant_type='nf4', blocksize 64. Seeded; deterministic on one machine.
"""
import os
import sys
from math import prod

import numpy as np
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(ROOT, "tests", "data", "quant")

DTYPE_NAME = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16",
              torch.uint8: "u8", torch.int64: "i64"}
SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


class Blob:
    def __init__(self):
        self.parts = []
        self.lines = []
        self.offset = 0

    def add(self, name, t):
        t = t.detach().contiguous().cpu()
        assert " " not in name
        if t.dtype in (torch.bfloat16, torch.float16):
            raw = t.view(torch.int16).numpy().astype("<i2").tobytes()
        else:
            raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()
        shape = " ".join(str(d) for d in t.shape) if t.dim() else ""
        self.lines.append(f"{name} {DTYPE_NAME[t.dtype]} {self.offset} {len(raw)} {shape}".rstrip())
        self.parts.append(raw)
        self.offset += len(raw)

    def write(self, directory):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "quant.bin"), "wb") as f:
            for p in self.parts:
                f.write(p)
        with open(os.path.join(directory, "index.txt"), "w") as f:
            f.write("# written by scripts/golden/quant.py (bitsandbytes %s, torch %s)\n"
                    % (bnb.__version__, torch.__version__))
            f.write("\n".join(self.lines) + "\n")


def make_input(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32) * 0.05
    # A few outliers so blocks get different absmax values.
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 97),), generator=g)
    flat[idx] *= 7.0
    return x.to(dtype)


def nested_absmax(state):
    absmax = F.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float()


def dequant(packed, absmax, shape, dtype):
    out = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, "nf4", list(shape), dtype)
    # bitsandbytes' native CPU kernel returns [1, n] for a 1-D shape of even length (it widens
    # the shape to 2-D for its row loop); the values are in order, so give them the input's shape.
    assert out.numel() == prod(shape)
    return out.reshape(shape)


def add_case(blob, name, x, nested_out_dtypes):
    """One input: packed bytes + plain absmax, nested parts, bnb dequantizations."""
    blob.add(f"{name}.input", x)
    packed, st = F.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    packed_n, st_n = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed, packed_n), "packed bytes should not depend on compress_statistics"
    blob.add(f"{name}.packed", packed.view(-1))
    blob.add(f"{name}.absmax", st.absmax)
    blob.add(f"{name}.absmax_q", st_n.absmax)
    blob.add(f"{name}.absmax2", st_n.state2.absmax)
    blob.add(f"{name}.offset", st_n.offset.reshape(1).float())
    blob.add(f"{name}.absmax_deq", nested_absmax(st_n))
    # Plain absmax: dequantize in fp32 (what F.dequantize_4bit gives for an fp32 state).
    plain = F.dequantize_4bit(packed, st)
    assert plain.dtype == x.dtype
    blob.add(f"{name}.deq_plain.f32", dequant(packed, st.absmax, x.shape, torch.float32))
    # Nested: every requested output dtype; the state's own dtype through the public API.
    for dt in nested_out_dtypes:
        out = dequant(packed, nested_absmax(st_n), x.shape, dt)
        if dt == x.dtype:
            api = F.dequantize_4bit(packed, st_n)
            assert torch.equal(api.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8))
        blob.add(f"{name}.deq_nested.{SHORT[dt]}", out)
    return st_n


def add_linear4bit(blob, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(96, 128, generator=g) * 0.05).to(dtype)
    x = torch.randn(4, 3, 128, generator=g).to(dtype)
    grad_out = torch.randn(4, 3, 96, generator=g).to(dtype)
    packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    xr = x.clone().requires_grad_(True)
    out = bnb.matmul_4bit(xr, packed.t(), quant_state=st)
    out.backward(grad_out)
    name = f"linear4bit.{SHORT[dtype]}"
    blob.add(f"{name}.w", w)
    blob.add(f"{name}.x", x)
    blob.add(f"{name}.grad_out", grad_out)
    blob.add(f"{name}.w_deq", F.dequantize_4bit(packed, st))
    blob.add(f"{name}.out", out.detach())
    blob.add(f"{name}.grad_x", xr.grad)


def main():
    torch.manual_seed(0)
    blob = Blob()
    blob.add("nf4_code", F.get_4bit_type("nf4", device="cpu"))
    blob.add("dynamic_map", F.create_dynamic_map())
    all3 = [torch.float32, torch.bfloat16, torch.float16]
    small = {"n64": [64], "n100": [100], "n4133": [4133], "s3x257": [3, 257], "s48x128": [48, 128]}
    seed = 1
    for key, shape in small.items():
        for dt in all3:
            add_case(blob, f"{key}.{SHORT[dt]}", make_input(shape, dt, seed), all3)
            seed += 1
    # > 256 blocks and a block count that is not a multiple of 256: 301 blocks, 2 second-level blocks.
    for dt in (torch.float32, torch.bfloat16):
        add_case(blob, f"n19217.{SHORT[dt]}", make_input([19217], dt, seed), [torch.float32, dt])
        seed += 1
    # Ties: values exactly on the midpoints between NF4 codes (absmax 1), both signs.
    code = F.get_4bit_type("nf4", device="cpu")
    mids = (code[:-1] + code[1:]) / 2
    ties = torch.cat([torch.tensor([1.0]), mids, -mids, mids * 0.999, torch.tensor([0.25] * 2)])
    ties = torch.cat([ties, ties * 3.0])  # two blocks, second with absmax 3 (scaled by a reciprocal)
    ties = torch.cat([ties, torch.tensor([0.5, -0.125, 0.0625])])  # a partial last block (divided)
    add_case(blob, "ties.f32", ties.float(), [torch.float32])
    for dt in (torch.float32, torch.bfloat16):
        add_linear4bit(blob, dt, 1000 + len(DTYPE_NAME) + (dt == torch.bfloat16))
    blob.write(OUT_DIR)
    total = blob.offset
    print(f"wrote {OUT_DIR}/quant.bin ({total} bytes, {len(blob.lines)} arrays) and index.txt")
    if total > 1536 * 1024:
        print("golden data larger than 1.5 MiB", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
