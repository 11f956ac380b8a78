"""Checks merged-model GGUF files against the merged Hugging Face model they came from, with
llama.cpp's own tools: the `gguf` package (gguf-py) reads the file, and llama.cpp itself (the
libllama bundled by the llama-cpp-py-sync wheel) runs it next to transformers. Run by
tests/test_gguf_merge.cpp with one JSON argument, a list of jobs; prints one JSON line, a list of
results in the same order.

    {"check": "values", "gguf": F, "hf": DIR, "arch": A, "type": "f16"|"bf16"|"q8_0"}
        -> {"fields": {key: value (arrays: their length and first entries)}, "tensors": {name:
            {"type", "ne"}}, "mismatched": [names whose bytes differ from the expected encoding
            of the fp32 merged tensor], "unexpected": [...], "missing": [...]}
    {"check": "run", "gguf": F, "hf": DIR, "ids": [...], "new_tokens": N}
        -> {"max_abs_diff": max |llama.cpp logits - transformers logits| over the prompt,
            "logit_scale": max |transformers logits|, "greedy_llama_cpp": [...],
            "greedy_transformers": [...]}

The expected bytes are computed here from the merged fp32 safetensors independently of qlora:
llama.cpp's tensor names, q/k rows in llama.cpp's order for its llama architecture, Gemma norms
as 1 + w, 1-D tensors F32, others rounded to F16 / BF16 (nearest even) or quantized to Q8_0 by
gguf.quants.
"""
import json
import os
import sys

import numpy as np


def hf_name_of(gguf_name, arch):
    """The merged model's tensor for a GGUF tensor name (None for one computed from config)."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    if gguf_name.startswith(("rope_freqs", "rope_factors")):
        return None
    _, layer, kind, suffix = gguf_name.split(".")
    gemma = arch in ("gemma2", "gemma3")
    names = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm" if gemma else "post_attention_layernorm",
             "ffn_post_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_down": "mlp.down_proj",
             "ffn_up": "mlp.gate_up_proj" if arch == "phi3" else "mlp.up_proj"}
    return f"model.layers.{layer}.{names[kind]}.{suffix}"


def expected_bytes(x, gguf_type):
    import gguf
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1 or gguf_type == "F32":
        return x.tobytes()
    if gguf_type == "F16":
        return x.astype(np.float16).tobytes()
    if gguf_type == "BF16":
        b = x.view(np.uint32).astype(np.uint64)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).tobytes()


def short(v):
    if isinstance(v, (list, tuple)):
        return {"len": len(v), "head": [short(x) for x in v[:4]]}
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def check_values(job):
    import gguf
    from safetensors.numpy import load_file
    cfg = json.load(open(os.path.join(job["hf"], "config.json")))
    merged = load_file(os.path.join(job["hf"], "model.safetensors"))
    r = gguf.GGUFReader(job["gguf"])
    fields = {k: short(f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    out = {"fields": fields, "tensors": {}, "mismatched": [], "unexpected": [], "missing": []}
    arch = job["arch"]
    heads = {"attn_q": cfg["num_attention_heads"],
             "attn_k": cfg.get("num_key_value_heads", cfg["num_attention_heads"])}
    seen = set()
    for t in r.tensors:
        out["tensors"][t.name] = {"type": t.tensor_type.name, "ne": [int(d) for d in t.shape]}
        hf = hf_name_of(t.name, arch)
        if hf is None:
            continue
        if hf not in merged:
            out["unexpected"].append(t.name)
            continue
        seen.add(hf)
        x = merged[hf].astype(np.float32)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if arch == "llama" and kind in heads:
            n = heads[kind]
            x = x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        if arch in ("gemma2", "gemma3") and t.name.endswith("norm.weight"):
            x = x + np.float32(1)
        if bytes(t.data.tobytes()) != expected_bytes(x, t.tensor_type.name):
            out["mismatched"].append(t.name)
    tied = cfg.get("tie_word_embeddings", arch in ("gemma2", "gemma3"))
    for name in merged:
        if name not in seen and not (name == "lm_head.weight" and (tied or arch == "gemma2")):
            out["missing"].append(name)
    return out


def llama_cpp_run(path, ids, new_tokens):
    from llama_cpp_py_sync import Llama
    llm = Llama(path, n_ctx=64, n_batch=64, n_threads=2, verbose=False)
    lib, ffi, ctx = llm._lib, llm._ffi, llm._ctx
    n_vocab = llm.n_vocab

    def decode(tokens, start, all_logits):
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (all_logits or i == len(tokens) - 1) else 0
        rc = lib.llama_decode(ctx, batch)
        lib.llama_batch_free(batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed: {rc}")
        rows = range(len(tokens)) if all_logits else [len(tokens) - 1]
        return np.array([np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * n_vocab), dtype=np.float32)
                         for i in rows])

    logits = decode(ids, 0, True)
    greedy, last = [], logits[-1]
    for k in range(new_tokens):
        tok = int(np.argmax(last))
        greedy.append(tok)
        if k + 1 < new_tokens:
            last = decode([tok], len(ids) + k, False)[-1]
    llm.close()
    return logits, greedy


def transformers_run(path, ids, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0].float().numpy()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens, pad_token_id=0)
    return logits, [int(t) for t in out[0, len(ids):]]


def check_run(job):
    ours, greedy_ours = llama_cpp_run(job["gguf"], job["ids"], job["new_tokens"])
    ref, greedy_ref = transformers_run(job["hf"], job["ids"], job["new_tokens"])
    return {"max_abs_diff": float(np.abs(ours - ref).max()), "logit_scale": float(np.abs(ref).max()),
            "greedy_llama_cpp": greedy_ours, "greedy_transformers": greedy_ref}


def main(argv):
    jobs = json.loads(argv[1])
    results = [check_values(j) if j["check"] == "values" else check_run(j) for j in jobs]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
