"""Golden files for the io module (tests/test_io_safetensors.cpp, tests/test_io_model_dir.cpp).

Run: .venv/bin/python scripts/golden/io.py
Writes under tests/data/io/:
  good_dtypes.safetensors   one small tensor of every dtype the reader knows (scalar and
                            zero-size tensors included) + a "__metadata__" map, written by the
                            Python safetensors package (safetensors.torch.save_file)
  good_dtypes.json          what the C++ reader must find: metadata, and per tensor its dtype,
                            shape, the raw bytes (hex) and the values as float64
  model_sharded/            a tiny random Llama saved by transformers' save_pretrained with a
                            small max_shard_size: config.json, model-0000k-of-0000n.safetensors,
                            model.safetensors.index.json
  model_sharded.json        per tensor of that model: shard file, dtype, shape, values (float64)
Deterministic (fixed seeds); small (a few tens of KB).
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "tests", "data", "io")

NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def describe(t):
    t = t.contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {
        "dtype": NAMES[t.dtype],
        "shape": list(t.shape),
        "hex": raw.hex(),
        "values": t.to(torch.float64).flatten().tolist(),
    }


def good_dtypes():
    g = torch.Generator().manual_seed(1234)
    r = lambda *s: torch.randn(*s, generator=g)
    tensors = {
        "f64.weight": r(3, 2).double(),
        "f32.weight": r(2, 3, 4),
        "f16.weight": (r(5, 3) * 10).half(),
        "bf16.weight": (r(4, 5) * 100).bfloat16(),
        "i64.ids": torch.randint(-2**40, 2**40, (6,), generator=g, dtype=torch.int64),
        "i32.ids": torch.randint(-2**30, 2**30, (2, 3), generator=g, dtype=torch.int32),
        "i16.ids": torch.randint(-2**15, 2**15, (7,), generator=g, dtype=torch.int16),
        "i8.ids": torch.randint(-128, 128, (3, 3), generator=g, dtype=torch.int8),
        "u8.codes": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
        "bool.mask": torch.randint(0, 2, (2, 5), generator=g).bool(),
        "f8e4m3.weight": r(2, 4).to(torch.float8_e4m3fn),
        "f8e5m2.weight": r(3,).to(torch.float8_e5m2),
        "scalar.f32": torch.tensor(3.25),
        "empty.f32": torch.zeros(0, 4),
        "layers.0/../odd name": r(2),  # any string is a valid tensor name; see the C++ test
    }
    meta = {"format": "pt"}  # one key: the Rust writer orders a map's keys at random
    path = os.path.join(OUT, "good_dtypes.safetensors")
    save_file(tensors, path, metadata=meta)
    expected = {"metadata": meta, "tensors": {k: describe(v) for k, v in tensors.items()}}
    with open(os.path.join(OUT, "good_dtypes.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", path, os.path.getsize(path), "bytes")


def model_sharded():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    d = os.path.join(OUT, "model_sharded")
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, max_shard_size="6KB", safe_serialization=True)
    for extra in os.listdir(d):  # keep only what the test needs
        if extra not in ("config.json", "model.safetensors.index.json") and not extra.endswith(".safetensors"):
            os.remove(os.path.join(d, extra))
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 2, shards
    from safetensors.torch import load_file
    expected = {}
    for shard in shards:
        for name, t in load_file(os.path.join(d, shard)).items():
            e = describe(t)
            del e["hex"]
            e["shard"] = shard
            expected[name] = e
    assert set(expected) == set(weight_map)
    with open(os.path.join(OUT, "model_sharded.json"), "w") as f:
        json.dump({"shards": shards, "tensors": expected}, f, sort_keys=True)
    print("wrote", d, "with", len(shards), "shards,", len(expected), "tensors")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    good_dtypes()
    model_sharded()
