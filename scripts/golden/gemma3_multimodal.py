"""Golden data for the text part of the multimodal Gemma 3 (model_type gemma3,
Gemma3ForConditionalGeneration): a tiny random model with a tiny image tower, run by transformers
and PEFT on text only. From the repository root (CPU, deterministic, a few seconds):

    .venv/bin/python scripts/golden/gemma3_multimodal.py          # writes tests/data/families/gemma3_mm/

The text model is scripts/golden/family_variants.py's gemma3 (3 layers, [sliding, sliding, full],
one kv head, linear RoPE scaling on the full layer, local RoPE base 10000), randomized as
families.py randomizes it; the image tower (SigLIP) and its projector are tiny and random. The
model is saved as transformers 5 saves it (language_model.model.*, vision_tower.*,
multi_modal_projector.*, lm_head tied: the published files' names, which save_pretrained
writes back from its modules' model.language_model.* ...) and config.json rewritten as the published 4B / 12B /
27B files spell it: text_config holding only what differs from Gemma3TextConfig's defaults plus
rope_scaling, the instruction-tuned files' top-level eos_token_id [1, 106]. The script checks
that transformers loads the same weights under its modules' names too (model.language_model.*,
model.vision_tower.*, model.multi_modal_projector.*), the other naming qlora reads.

Files (tests/data/families/gemma3_mm/):
  config.json, model.safetensors    the base
  golden.safetensors                input_ids, attention_mask, labels (the padded batch of
                                    golden/model.py), logits, loss: fp32, eager attention
  lora/adapter/                     PEFT's LoRA (r 8, alpha 16, q/k/v/o of the language model as
                                    a regular expression) after golden/model.py's lora_step
  lora/golden.safetensors           lora_logits, lora_loss and grad.<PEFT key> of every LoRA weight
  lora/merged.safetensors           merged.<name>: the tensors PEFT's merge_and_unload changed

Checks of what qlora writes (tests/test_model_gemma3_multimodal.cpp runs them):
  --make-model DIR VOCAB      a random model of this shape with VOCAB rows (end-to-end training)
  --check-adapter DIR         DIR/adapter_config.json + adapter_model.safetensors (qlora's) load
                              into PEFT on the base DIR/base (default: the golden base) and give
                              DIR/qlora_logits.safetensors on the golden batch within 1e-4
  --check-merged DIR          DIR/merged (qlora merge, fp32) equals PEFT's merge_and_unload of
                              DIR/adapter on DIR/base, and transformers loads it as
                              Gemma3ForConditionalGeneration
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as golden_model  # noqa: E402  (randomize, make_batch, lora_step, save_lora)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "families", "gemma3_mm")
SEED = 41
LOGIT_TOL = 1e-4  # qlora's adapter logits vs PEFT's, absolute on real tokens (golden/model.py's)
MERGE_TOL = 1e-5  # qlora merge (fp32) vs merge_and_unload
EAGER = dict(attn_implementation="eager")
# What qlora writes as target_modules for LoRA on q/k/v/o of a multimodal Gemma 3
# (src/lora/adapter_config.cpp): the image tower has q_proj ... too.
TARGETS = r"(model\.language_model|language_model\.model)\.layers\.\d+\.(self_attn|mlp)\.(k_proj|o_proj|q_proj|v_proj)"
# Gemma3TextConfig's defaults that the tiny text model keeps; config.json's text_config leaves
# them out, as the published files do.
TEXT_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "query_pre_attn_scalar", "sliding_window", "sliding_window_pattern"]
TOWER = ("model.vision_tower.", "model.multi_modal_projector.")


def config(vocab):
    text = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, sliding_window_pattern=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
        rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1000000.0, factor=8.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})
    # 14 / 7 = 2 patches a side, 4 image tokens (2 a side): the projector pools with kernel 1.
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=14, patch_size=7)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=vocab - 3,
                       eoi_token_index=vocab - 2, image_token_index=vocab - 1, **EAGER)
    return cfg


def randomize(model, seed):
    """golden/model.py's randomize on the text model, with families.py's Gemma norms (w = draw - 1,
    so that 1 + w is random around 1); the image tower and projector get 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(TOWER):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def module_name(name):
    """The name transformers 5's model gives a tensor that save_pretrained writes under the names of
    checkpoints saved before transformers 4.52 (it renames them back on save)."""
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return "model." + name if name.startswith(tuple(t[len("model."):] for t in TOWER)) else name


def write_hub_config(d, eos):
    """config.json as the published files spell it: text_config with the keys that differ from
    Gemma3TextConfig's defaults and rope_scaling; eos_token_id at the top."""
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    t = cfg["text_config"]
    rope = t["rope_parameters"]
    assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}, rope
    assert rope["full_attention"] == {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}, rope
    text = {k: t[k] for k in TEXT_KEYS if k in t}
    text["sliding_window_pattern"] = 3
    text["model_type"] = "gemma3_text"
    text["rope_scaling"] = {"factor": 8.0, "rope_type": "linear"}
    keep = ["architectures", "boi_token_index", "eoi_token_index", "image_token_index", "initializer_range",
            "mm_tokens_per_image", "model_type", "transformers_version", "vision_config"]
    out = {k: cfg[k] for k in keep}
    out.update(text_config=text, torch_dtype="float32")
    if eos is not None:
        out["eos_token_id"] = eos
    with open(path, "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
        f.write("\n")


def make_model(d, vocab, eos=None):
    torch.manual_seed(SEED)
    built = Gemma3ForConditionalGeneration(config(vocab)).float().eval()
    randomize(built, SEED)
    shutil.rmtree(d, ignore_errors=True)
    golden_model.save_model(built, d)
    write_hub_config(d, eos)
    return built


def load_base(d=OUT):
    model = Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32, **EAGER).eval()
    assert model.config._attn_implementation == "eager"
    return model


def check_reload(built, d):
    """transformers reads config.json as written, and the weights under both namings: the
    published files' (and save_pretrained's), language_model.model.*, vision_tower.*,
    multi_modal_projector.*, and its modules' own, model.language_model.*, model.vision_tower.*."""
    saved = built.state_dict()
    tensors = load_file(os.path.join(d, "model.safetensors"))
    assert any(n.startswith("language_model.model.layers.") for n in tensors), sorted(tensors)[:5]
    assert not any(n.startswith("model.") or "lm_head" in n for n in tensors), sorted(tensors)  # lm_head: tied
    with tempfile.TemporaryDirectory() as other:
        shutil.copy(os.path.join(d, "config.json"), other)
        save_file({module_name(k): v for k, v in tensors.items()}, os.path.join(other, "model.safetensors"),
                  metadata={"format": "pt"})
        for where in (d, other):
            model = load_base(where)
            assert model.config.text_config.layer_types == ["sliding_attention", "sliding_attention",
                                                            "full_attention"]
            assert sorted(model.state_dict()) == sorted(saved)
            for k, v in model.state_dict().items():
                assert torch.equal(v, saved[k]), (where, k)


def make_golden():
    built = make_model(OUT, golden_model.VOCAB, eos=[1, 106])
    check_reload(built, OUT)
    model = load_base()
    ids, mask, out, batch = golden_model.golden_forward(model)
    save_file(batch, os.path.join(OUT, "golden.safetensors"))
    print(f"wrote {OUT}: loss {out.loss.item():.6f}, |logits| max {out.logits.abs().max().item():.3f}")

    base = load_base()
    base.name_or_path = base.config._name_or_path = os.path.relpath(OUT, ROOT)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model, out, grads = golden_model.lora_step(base, lora, SEED + 100)
    assert grads and all(k.startswith("grad.base_model.model.model.language_model.layers.") for k in grads), grads
    d = os.path.join(OUT, "lora")
    golden_model.save_lora(peft_model, d, {"lora_logits": out.logits.detach().float().contiguous(),
                                           "lora_loss": out.loss.detach().float().reshape(()), **grads})
    merged = peft_merged(OUT, os.path.join(d, "adapter"))
    base_sd = load_base().state_dict()
    changed = {k: v for k, v in merged.items() if not torch.equal(v, base_sd[k])}
    assert changed and all(k.startswith("model.language_model.layers.") and "_proj." in k for k in changed), changed
    save_file({"merged." + k: v.float().contiguous() for k, v in sorted(changed.items())},
              os.path.join(d, "merged.safetensors"))
    print(f"wrote {d}: {len(grads)} LoRA gradients, loss {out.loss.item():.6f}, {len(changed)} merged weights")
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"tests/data/families/gemma3_mm: {size / 1024:.0f} KiB")


def peft_merged(base_dir, adapter_dir):
    model = PeftModel.from_pretrained(load_base(base_dir), adapter_dir).eval()
    merged = model.merge_and_unload()
    sd = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    sd.pop("lm_head.weight", None)  # tied: save_pretrained leaves it out
    return sd


def check_adapter(d, base_dir):
    ids, mask, _ = golden_model.make_batch()
    with torch.no_grad():
        base_logits = load_base(base_dir)(input_ids=ids, attention_mask=mask).logits.float()
    model = PeftModel.from_pretrained(load_base(base_dir), d).eval()
    effect, err, cfg, n_saved = golden_model.compare_with_peft(model, d, ids, mask, base_logits)
    targets = cfg["target_modules"]
    print(f"gemma3_mm: PEFT loaded qlora's adapter ({n_saved} LoRA weights, targets {targets}); "
          f"max |logits_peft - logits_qlora| = {err:.3e} (the adapter moves logits by up to {effect:.3f})")
    return golden_model.verdict(err > LOGIT_TOL or effect < 1e-3)


def check_merged(d, base_dir):
    merged_dir = os.path.join(d, "merged")
    want = peft_merged(base_dir, os.path.join(d, "adapter"))
    got = load_file(os.path.join(merged_dir, "model.safetensors"))
    base_names = sorted(load_file(os.path.join(base_dir, "model.safetensors")))
    bad = sorted(got) != base_names
    if bad:
        print(f"gemma3_mm: the merged file's names differ from the base's: {sorted(set(got) ^ set(base_names))[:6]}")
    # The merged model as transformers loads it (the base's naming, either one), against PEFT's.
    model = load_base(merged_dir)
    assert type(model) is Gemma3ForConditionalGeneration
    sd = model.state_dict()
    err, changed = 0.0, 0
    base_sd = load_base(base_dir).state_dict()
    for k, v in want.items():
        err = max(err, (sd[k] - v).abs().max().item())
        changed += not torch.equal(v, base_sd[k])
    tower = max((sd[k] - base_sd[k]).abs().max().item() for k in sd if k.startswith(TOWER))
    print(f"gemma3_mm: max |qlora merged - PEFT merge_and_unload| = {err:.3e} over {len(want)} tensors "
          f"({changed} merged); the image tower moved by {tower:.1e}")
    return golden_model.verdict(bad or err > MERGE_TOL or changed == 0 or tower != 0)


def main():
    golden_model.fix_string_hashing()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-model", nargs=2, metavar=("DIR", "VOCAB"))
    ap.add_argument("--check-adapter", metavar="DIR")
    ap.add_argument("--check-merged", metavar="DIR")
    ap.add_argument("--base", metavar="DIR", help="the checks' base model (default: the golden one)")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    base = args.base or OUT
    if args.make_model:
        make_model(args.make_model[0], int(args.make_model[1]))
        print(f"wrote {args.make_model[0]}: gemma3 (multimodal), vocab {args.make_model[1]}")
        return 0
    if args.check_adapter:
        return check_adapter(args.check_adapter, base)
    if args.check_merged:
        return check_merged(args.check_merged, base)
    make_golden()
    return 0


if __name__ == "__main__":
    sys.exit(main())
