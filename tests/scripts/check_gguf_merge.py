"""Checks merged-model GGUF files against the merged Hugging Face model they came from, and LoRA
adapter GGUF files against PEFT, with llama.cpp's own tools: the `gguf` package (gguf-py) reads
the file, and llama.cpp itself (the CPU build in the llama-cpp-cffi wheel, see load_llama_cpp)
runs it next to transformers. Run by tests/test_gguf_merge.cpp and tests/test_gguf_export.cpp
with one JSON argument, a list of jobs; prints one JSON line, a list of results in the same order.

    {"check": "values", "gguf": F, "hf": DIR, "arch": A, "type": "f16"|"bf16"|"q8_0"}
        -> {"fields": {key: value (arrays: their length and first entries)}, "tensors": {name:
            {"type", "ne"}}, "mismatched": [names whose bytes differ from the expected encoding
            of the fp32 merged tensor], "unexpected": [...], "missing": [...], "unnamed": [names
            gguf-py does not list for the architecture]}
    {"check": "run", "gguf": F, "hf": DIR, "ids": [...], "new_tokens": N}
        -> {"max_abs_diff": max |llama.cpp logits - transformers logits| over the prompt,
            "max_abs_diff_by_position": [...], "logit_scale": max |transformers logits|,
            "greedy_llama_cpp": [...], "greedy_transformers": [...]}, or {"error": llama.cpp's
            message} when it cannot load or run the file
    {"check": "lora", "gguf": F, "lora": L, "hf": DIR, "adapter": ADIR, "ids": [...], "new_tokens": N}
        -> "run"'s result for llama.cpp running the model F with the adapter GGUF L applied (scale
            1) next to transformers' model DIR (fp32) with PEFT's adapter ADIR, plus
            "adapter_effect": max |PEFT logits - the base's logits| over the prompt (what a
            dropped adapter would be off by)
    {"check": "loads"} -> {"system_info": ...} (fails when llama.cpp cannot be loaded)
    {"check": "grow", "dir": DIR, "layers": N} -> {"layers": N}: see grow()

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
    names = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
             "ffn_norm": "pre_feedforward_layernorm" if gemma else "post_attention_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
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
    out = {"fields": fields, "tensors": {}, "mismatched": [], "unexpected": [], "missing": [], "unnamed": []}
    arch = job["arch"]
    # The tensor names gguf-py lists for the architecture, as llama.cpp looks them up.
    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch_id]}
    heads = {"attn_q": cfg["num_attention_heads"],
             "attn_k": cfg.get("num_key_value_heads", cfg["num_attention_heads"])}
    seen = set()
    for t in r.tensors:
        out["tensors"][t.name] = {"type": t.tensor_type.name, "ne": [int(d) for d in t.shape]}
        parts = t.name.split(".")
        stem = ".".join(["blk", "{bid}", *parts[2:-1]] if parts[0] == "blk" else parts[:-1])
        if stem not in known:
            out["unnamed"].append(t.name)
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


def load_llama_cpp():
    """llama.cpp's C API: the CPU build of the llama-cpp-cffi wheel, a CFFI module (lib, ffi).

    scripts/setup.sh installs only that module (llama/_llama_cpp_cpu.*.so, in a namespace package
    `llama`), not the wheel's Python wrapper and its dependencies. Its one symbol this glibc's
    libstdc++ lacks, __cxa_call_terminate (GCC 14: an exception leaving a noexcept function), is
    bound lazily, so it is looked up only on the way to std::terminate."""
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)
    try:
        from llama._llama_cpp_cpu import ffi, lib
    finally:
        sys.setdlopenflags(flags)
    return lib, ffi


_log = []


def llama_cpp_lib():
    lib, ffi = load_llama_cpp()
    if not hasattr(llama_cpp_lib, "callback"):
        @ffi.callback("void(enum ggml_log_level, const char *, void *)")
        def on_log(level, text, user_data):
            _log.append(ffi.string(text).decode(errors="replace"))
        llama_cpp_lib.callback = on_log
        lib.llama_log_set(on_log, ffi.NULL)
        lib.llama_backend_init()
    return lib, ffi


def llama_cpp_run(path, ids, new_tokens, lora=None):
    """Logits of every prompt position and `new_tokens` greedy tokens from llama.cpp, the KV cache
    in F32 (so only the weights' encoding differs from transformers' fp32); with `lora`, that
    adapter GGUF applied at scale 1 on the model `path`. Raises with llama.cpp's log on failure."""
    lib, ffi = llama_cpp_lib()
    del _log[:]
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(path.encode(), mp)
    if model == ffi.NULL:
        raise RuntimeError("llama.cpp cannot load " + path + ": " + "".join(_log[-3:]).strip())
    adapter = ffi.NULL
    cp = lib.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
    cp.n_threads = cp.n_threads_batch = 2
    cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
    ctx = lib.llama_init_from_model(model, cp)
    try:
        if ctx == ffi.NULL:
            raise RuntimeError("llama.cpp cannot make a context: " + "".join(_log[-3:]).strip())
        if lora:
            adapter = lib.llama_adapter_lora_init(model, lora.encode())
            if adapter == ffi.NULL or lib.llama_set_adapter_lora(ctx, adapter, 1.0) != 0:
                raise RuntimeError("llama.cpp cannot apply " + lora + ": " + "".join(_log[-3:]).strip())
        n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))

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
            return np.array([np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * n_vocab),
                                           dtype=np.float32).copy() for i in rows])

        logits = decode(ids, 0, True)
        greedy, last = [], logits[-1]
        for k in range(new_tokens):
            tok = int(np.argmax(last))
            greedy.append(tok)
            if k + 1 < new_tokens:
                last = decode([tok], len(ids) + k, False)[-1]
    finally:
        if ctx != ffi.NULL:
            lib.llama_free(ctx)
        if adapter != ffi.NULL:
            lib.llama_adapter_lora_free(adapter)
        lib.llama_model_free(model)
    return logits, greedy


def transformers_run(path, ids, new_tokens, adapter=None):
    """Logits of every prompt position and `new_tokens` greedy tokens from transformers in fp32;
    with `adapter`, PEFT's LoRA adapter applied (unmerged), and the base's logits as a third value."""
    import torch
    from transformers import AutoModelForCausalLM
    # Eager attention: SDPA leaves out Gemma 2's attention logit softcapping.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0].float().numpy()
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             do_sample=False, min_new_tokens=new_tokens, pad_token_id=0)
        if not adapter:
            return logits, [int(t) for t in out[0, len(ids):]]
        with model.disable_adapter():
            base = model(x).logits[0].float().numpy()
    return logits, [int(t) for t in out[0, len(ids):]], base


def compare(ours, greedy_ours, ref, greedy_ref):
    return {"max_abs_diff": float(np.abs(ours - ref).max()), "logit_scale": float(np.abs(ref).max()),
            "max_abs_diff_by_position": [float(d) for d in np.abs(ours - ref).max(axis=1)],
            "greedy_llama_cpp": greedy_ours, "greedy_transformers": greedy_ref}


def check_run(job):
    try:
        ours, greedy_ours = llama_cpp_run(job["gguf"], job["ids"], job["new_tokens"])
    except RuntimeError as e:
        return {"error": str(e)}
    return compare(ours, greedy_ours, *transformers_run(job["hf"], job["ids"], job["new_tokens"]))


def check_lora(job):
    try:
        ours, greedy_ours = llama_cpp_run(job["gguf"], job["ids"], job["new_tokens"], lora=job["lora"])
    except RuntimeError as e:
        return {"error": str(e)}
    ref, greedy_ref, base = transformers_run(job["hf"], job["ids"], job["new_tokens"], adapter=job["adapter"])
    return dict(compare(ours, greedy_ours, ref, greedy_ref), adapter_effect=float(np.abs(ref - base).max()))


def grow(job):
    """Repeats a base model's layers cyclically up to job["layers"] (model.safetensors and
    config.json's num_hidden_layers, in place): the llama.cpp build checks some families only at
    the depths of their real models."""
    import re
    from safetensors.numpy import load_file, save_file
    cfg_path, st_path = os.path.join(job["dir"], "config.json"), os.path.join(job["dir"], "model.safetensors")
    cfg = json.load(open(cfg_path))
    n, tensors = cfg["num_hidden_layers"], load_file(st_path)
    for name, x in list(tensors.items()):
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m:
            for layer in range(int(m.group(1)) + n, job["layers"], n):
                tensors[f"model.layers.{layer}.{m.group(2)}"] = x.copy()
    cfg["num_hidden_layers"] = job["layers"]
    save_file(tensors, st_path, metadata={"format": "pt"})
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    return {"layers": job["layers"]}


def check_loads(job):
    lib, ffi = llama_cpp_lib()
    return {"system_info": ffi.string(lib.llama_print_system_info()).decode().strip()}


def main(argv):
    jobs = json.loads(argv[1])
    checks = {"values": check_values, "run": check_run, "lora": check_lora, "loads": check_loads, "grow": grow}
    print(json.dumps([checks[j["check"]](j) for j in jobs]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
