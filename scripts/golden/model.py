"""Golden data for the model and lora modules: tiny random Llamas run by transformers + PEFT.

Run from the repository root with the project's venv (CPU, deterministic):

    .venv/bin/python scripts/golden/model.py            # writes tests/data/model/

What it writes under tests/data/model/ (read by tests/test_model_llama.cpp and tests/test_lora.cpp):

    <variant>/config.json, <variant>/model.safetensors   save_pretrained output (fp32)
    <variant>/golden.safetensors                          inputs and outputs of transformers:
        input_ids [B,T] i64, attention_mask [B,T] i64, labels [B,T] i64 (-100 on padding),
        logits [B,T,V] f32, loss [] f32 (transformers' mean over label tokens),
        loss_sum [] f32, loss_count [] i64, inv_freq [head_dim/2] f32 (the rotary buffer),
        logits_bf16 / logits_fp16 [B,T,V]: the same model loaded with dtype bfloat16 / float16
        logits_nf4 [B,T,V] (llama3_untied only): fp32, every decoder projection replaced by its
            bitsandbytes NF4 round trip (quantize_4bit blocksize 64, double quant; dequantize_4bit)
    for variants llama3_tied, llama3_untied (GQA, llama3 rope scaling) and llama2
    (multi-head attention, plain RoPE, theta 10000).

    lora_qkvo/    PEFT LoRA r 8, alpha 16, dropout 0, q,k,v,o on llama3_untied
    lora_all_rslora/  PEFT LoRA r 8, alpha 16, all-linear, use_rslora, on llama3_tied
        adapter/  adapter_config.json + adapter_model.safetensors as PEFT's save_pretrained wrote them
        golden.safetensors: logits [B,T,V], loss [], and "grad.<peft key>" for every LoRA weight
            after one backward of the loss (keys as in adapter_model.safetensors)
    lora_init.safetensors: kaiming_uniform_(a=sqrt(5)) of a [8, 64] tensor after torch.manual_seed(1234),
        as PEFT's reset_lora_parameters initializes lora_A.

B is set non-zero (seeded normal) before saving so gradients of A are non-trivial.

Reverse check (an adapter written by qlora loads in PEFT with equal logits):

    ctest --test-dir build -R PeftLoadsOurAdapters     (runs this script's --check-adapter)

The test writes, for each LoRA variant V, DIR/V/ (adapter_config.json,
adapter_model.safetensors, qlora_logits.safetensors holding the logits qlora computed for the
golden batch). The check loads each into PEFT on the same base model and prints the max absolute
logit difference; it exits 1 if any exceeds 1e-4.
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "model")
VOCAB = 256
BATCH_LENGTHS = [12, 7, 10]  # right padding to T = 12
T = 12
PAD_ID = 0
LOGIT_TOL = 1e-4


def base_config(tied, llama3):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    if llama3:
        # A short original context so that all three llama3 bands (kept, interpolated,
        # divided by factor) occur among the 8 frequencies of head_dim 16.
        return LlamaConfig(
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            **common,
        )
    return LlamaConfig(
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        **common,
    )


def randomize(model, seed):
    # transformers' init (std 0.02, unit norms) gives logits near 0, which would make a
    # 1e-4 absolute comparison blind; use O(1) activations and non-trivial norm weights
    # (q_norm / k_norm included), and non-zero biases where a family has them (golden/families.py).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def make_batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (len(BATCH_LENGTHS), T), generator=g)
    mask = torch.zeros(len(BATCH_LENGTHS), T, dtype=torch.int64)
    for b, n in enumerate(BATCH_LENGTHS):
        mask[b, :n] = 1
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD_ID))
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return ids, mask, labels


def loss_sum_count(logits, labels):
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])
    s = torch.nn.functional.cross_entropy(flat, shift.reshape(-1), ignore_index=-100, reduction="sum")
    return s, (shift != -100).sum()


def make_base(name, tied, llama3, seed):
    torch.manual_seed(seed)
    cfg = base_config(tied, llama3)
    model = LlamaForCausalLM(cfg).float().eval()
    randomize(model, seed)
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    save_model(model, d)
    ids, mask, out, tensors = golden_forward(model)
    half = {}
    for key, dtype in (("logits_bf16", torch.bfloat16), ("logits_fp16", torch.float16)):
        m16 = LlamaForCausalLM.from_pretrained(d, dtype=dtype).eval()
        with torch.no_grad():
            half[key] = m16(input_ids=ids, attention_mask=mask).logits.contiguous()
    if name == "llama3_untied":
        half["logits_nf4"] = nf4_logits(d, ids, mask)
    inv_freq = model.model.rotary_emb.inv_freq.detach().float().contiguous()
    save_file({**tensors, "inv_freq": inv_freq, **half}, os.path.join(d, "golden.safetensors"))
    print(f"wrote {d}: loss {out.loss.item():.6f}, |logits| max {out.logits.abs().max().item():.3f}")
    return d


def save_model(model, d):
    """save_pretrained into d (safetensors), less generation_config.json."""
    model.save_pretrained(d, safe_serialization=True)
    p = os.path.join(d, "generation_config.json")
    if os.path.exists(p):
        os.remove(p)


def golden_forward(model):
    """`model` on make_batch() without gradients: (ids, mask, its output, what every base's
    golden.safetensors holds: the batch, logits, loss, and loss_sum / loss_count as
    loss_sum_count sums them)."""
    ids, mask, labels = make_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    s, n = loss_sum_count(out.logits, labels)
    return ids, mask, out, {
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "labels": labels.contiguous(),
        "logits": out.logits.float().contiguous(),
        "loss": out.loss.detach().float().reshape(()),
        "loss_sum": s.detach().float().reshape(()),
        "loss_count": n.reshape(()).to(torch.int64),
    }


def nf4_logits(model_dir, ids, mask):
    """fp32 logits with every decoder projection replaced by bitsandbytes' NF4 round trip
    (blocksize 64, double quantization): what a QLoRA base computes before any adapter."""
    import bitsandbytes.functional as bnbf

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                q, state = bnbf.quantize_4bit(mod.weight.data, blocksize=64, compress_statistics=True,
                                              quant_type="nf4")
                mod.weight.data = bnbf.dequantize_4bit(q, state).to(torch.float32)
        return model(input_ids=ids, attention_mask=mask).logits.float().contiguous()


def load_base(name):
    return LlamaForCausalLM.from_pretrained(os.path.join(OUT, name), dtype=torch.float32).eval()


def compare_with_peft(model, d, ids, mask, base_logits):
    """PEFT's model with qlora's adapter from `d` loaded: checks PEFT loaded exactly the saved LoRA
    weights, and returns (how far the adapter moves the logits, max |PEFT - qlora| on real tokens,
    the adapter's target_modules, how many LoRA weights)."""
    saved = load_file(os.path.join(d, "adapter_model.safetensors"))
    loaded = {peft_key(n): p for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(loaded) == sorted(saved), ("PEFT's LoRA modules differ from the saved keys",
                                             sorted(set(loaded) ^ set(saved))[:6])
    assert all(torch.equal(loaded[k], saved[k]) for k in saved), "PEFT did not load the saved values"
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    effect = (logits - base_logits).abs().max().item()
    theirs = load_file(os.path.join(d, "qlora_logits.safetensors"))["logits"].float()
    # Real tokens only: a padding query that a sliding window leaves with no key differs by
    # design (eager attention spreads it uniformly, SDPA gives zeros); nothing reads it.
    err = ((logits - theirs).abs() * mask.unsqueeze(-1)).max().item()
    with open(os.path.join(d, "adapter_config.json")) as f:
        cfg = json.load(f)
    return effect, err, cfg, len(saved)


def lora_variants():
    return {
        "lora_qkvo": dict(
            base="llama3_untied",
            config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                              task_type="CAUSAL_LM"),
        ),
        "lora_all_rslora": dict(
            base="llama3_tied",
            config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                              use_rslora=True, task_type="CAUSAL_LM"),
        ),
    }


def peft_key(param_name):
    # "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" -> the saved key
    return param_name.replace(".default.", ".")


def make_lora(name, spec, seed):
    base = load_base(spec["base"])
    # Recorded in adapter_config.json: a path relative to the repository root, not this checkout's.
    base.name_or_path = base.config._name_or_path = os.path.relpath(os.path.join(OUT, spec["base"]), ROOT)
    model, out, grads = lora_step(base, spec["config"], seed)
    ids, mask, labels = make_batch()
    tensors = {
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "labels": labels.contiguous(),
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(()),
        **grads,
    }
    d = os.path.join(OUT, name)
    save_lora(model, d, tensors)
    print(f"wrote {d}: {len(grads)} LoRA gradients, loss {out.loss.item():.6f}")


def lora_step(base, config, seed):
    """PEFT's LoRA `config` on `base` (torch seeded with `seed`), B set to a seeded normal (seed + 1)
    so that A's gradients are not zero, and one forward and backward of make_batch() in train mode:
    (the PEFT model, its output, {"grad.<peft key>": gradient of every LoRA weight})."""
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    ids, mask, labels = make_batch()
    model.train()  # dropout is 0, so train/eval give the same numbers
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {}
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, pname
            grads["grad." + peft_key(pname)] = p.grad.detach().float().contiguous()
    return model, out, grads


def save_lora(model, d, tensors):
    """d/adapter/ as PEFT's save_pretrained writes it (less its model card) and d/golden.safetensors."""
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    model.save_pretrained(os.path.join(d, "adapter"))
    os.remove(os.path.join(d, "adapter", "README.md"))  # a model card template, not data
    save_file(tensors, os.path.join(d, "golden.safetensors"))


def make_init_golden():
    w = torch.empty(8, 64)
    torch.manual_seed(1234)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    save_file({"lora_A": w.contiguous()}, os.path.join(OUT, "lora_init.safetensors"))


def check_adapter(root):
    return check_adapters(root, {name: (lambda base=spec["base"]: load_base(base))
                                 for name, spec in lora_variants().items()})


def check_adapters(root, bases):
    """--check-adapter: for each name -> a function that loads its fp32 base model, the adapter qlora
    wrote to root/<name>/ loaded into PEFT on that base gives, on make_batch(), the logits qlora
    saved beside it (qlora_logits.safetensors) within LOGIT_TOL on the real tokens. Prints a line a variant and the
    verdict; returns the exit code."""
    worst = 0.0
    found = 0
    for name, load in bases.items():
        d = os.path.join(root, name)
        if not os.path.isdir(d):
            print(f"{d}: missing")
            continue
        found += 1
        ids, mask, _ = make_batch()
        with torch.no_grad():
            base_logits = load()(input_ids=ids, attention_mask=mask).logits.float()
        model = PeftModel.from_pretrained(load(), d).eval()  # a fresh base: dynamic RoPE keeps state
        effect, err, cfg, _ = compare_with_peft(model, d, ids, mask, base_logits)
        print(f"{name}: PEFT loaded qlora's adapter (r {cfg['r']}, targets {cfg['target_modules']}); "
              f"max |logits_peft - logits_qlora| = {err:.3e} (the adapter moves logits by up to {effect:.3f})")
        worst = max(worst, err)
        if effect < 1e-3:
            print("  the adapter has no effect: B is zero?")
            worst = float("inf")
    return verdict(found == 0 or worst > LOGIT_TOL)


def verdict(failed):
    """Prints FAILED or OK; the exit code (1, 0)."""
    print("FAILED" if failed else "OK")
    return 1 if failed else 0


def fix_string_hashing():
    """PEFT writes target_modules from a set: the running script starts again with string hashing
    fixed (PYTHONHASHSEED=0) unless it already is, so that reruns give equal files."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)


def main():
    fix_string_hashing()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-adapter", metavar="DIR", help="load qlora-written adapters from DIR into PEFT")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    if args.check_adapter:
        sys.exit(check_adapter(args.check_adapter))
    os.makedirs(OUT, exist_ok=True)
    make_base("llama3_tied", tied=True, llama3=True, seed=11)
    make_base("llama3_untied", tied=False, llama3=True, seed=12)
    make_base("llama2", tied=False, llama3=False, seed=13)
    for i, (name, spec) in enumerate(lora_variants().items()):
        make_lora(name, spec, seed=100 + i)
    make_init_golden()
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"tests/data/model: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
