"""Golden data for `qlora merge`: a tiny bf16 Llama, two PEFT adapters, and transformers' logits.

Run from the repository root with the project's venv (CPU, deterministic):

    .venv/bin/python scripts/golden/merge.py            # writes tests/data/merge/

What it writes under tests/data/merge/ (read by tests/test_lora_merge.cpp):

    base/            save_pretrained of a random Llama (GQA, untied lm_head) in bfloat16, plus
                     tokenizer.json copied from tests/data/tokenizer/bpe, tokenizer_config.json and
                     special_tokens_map.json
    adapter/         PEFT LoRA r 8, alpha 16 on q,k,v,o and down_proj (gate/up left alone)
    adapter_rslora/  PEFT LoRA r 4, alpha 8, use_rslora, on gate_proj and up_proj
                     (both with random non-zero lora_B)
    golden.safetensors:
        input_ids, attention_mask [B,T] i64   right-padded batch (as tests/data/model uses)
        logits_base [B,T,V] f32               the base alone
        logits_peft                           PeftModel(base, adapter), unmerged
        logits_merged_bf16                    merge_and_unload() in fp32, weights cast to bf16
        logits_rslora_peft / logits_rslora_merged_bf16   the same for adapter_rslora
        logits_nf4_peft / logits_nf4_merged_bf16         the same for adapter on the NF4 base:
            every decoder projection replaced by bitsandbytes' round trip of its bf16 weight
            (quantize_4bit nf4, blocksize 64, compress_statistics=True; dequantize_4bit)
    Every forward runs in fp32 (the bf16 base upcast exactly), so the only roundings that
    separate "merged" from "peft" are the bf16 casts of the merged weights.

Check of a merged directory written by qlora: scripts/check_merged_hf.py.
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as golden_model  # noqa: E402  (base_config, randomize, make_batch)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "merge")
TOKENIZER_DIR = os.path.join(ROOT, "tests", "data", "tokenizer", "bpe")

ADAPTERS = {
    "adapter": LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                          task_type="CAUSAL_LM"),
    "adapter_rslora": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True,
                                 target_modules=["gate_proj", "up_proj"], task_type="CAUSAL_LM"),
}


def make_base():
    torch.manual_seed(21)
    model = LlamaForCausalLM(golden_model.base_config(tied=False, llama3=True)).float().eval()
    golden_model.randomize(model, 21)
    d = os.path.join(OUT, "base")
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    shutil.copy(os.path.join(TOKENIZER_DIR, "tokenizer.json"), os.path.join(d, "tokenizer.json"))
    # Its own tokenizer_config.json (bpe's writes eos_token as a bare dict, which AutoTokenizer
    # refuses) and a special_tokens_map.json, so the copy of both is exercised.
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
                   "clean_up_tokenization_spaces": False, **special}, f, indent=2)
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    return d


def load_fp32(base_dir):
    return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def nf4_round_trip(model):
    """Replaces every decoder projection's weight by bitsandbytes' NF4 round trip of its bf16
    value, as QLoRA training sees the base (the stored dtype is what gets quantized)."""
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                w16 = mod.weight.data.to(torch.bfloat16)
                q, state = bnbf.quantize_4bit(w16, blocksize=64, compress_statistics=True, quant_type="nf4")
                mod.weight.data = bnbf.dequantize_4bit(q, state).to(torch.float32)
    return model


def make_adapter(base_dir, name, config, seed):
    base = load_fp32(base_dir)
    base.name_or_path = base.config._name_or_path = "tests/data/merge/base"
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    d = os.path.join(OUT, name)
    model.save_pretrained(d)
    os.remove(os.path.join(d, "README.md"))  # a model card template, not data
    return d


def logits_of(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().contiguous()


def peft_and_merged(base, adapter_dir, ids, mask):
    peft = PeftModel.from_pretrained(base, adapter_dir).eval()
    unmerged = logits_of(peft, ids, mask)
    merged = peft.merge_and_unload()  # fp32 base += fp32 B·A·scaling
    with torch.no_grad():
        # The parameters only: a module-wide .to(bfloat16) would also round the rotary inv_freq
        # buffer, which every loader recomputes in fp32.
        for p in merged.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return unmerged, logits_of(merged, ids, mask)


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        # PEFT writes target_modules from a set: fix string hashing so reruns give equal files.
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    torch.use_deterministic_algorithms(True)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    base_dir = make_base()
    adapter_dirs = {name: make_adapter(base_dir, name, cfg, 200 + i) for i, (name, cfg) in enumerate(ADAPTERS.items())}

    ids, mask, _ = golden_model.make_batch()
    out = {"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}
    out["logits_base"] = logits_of(load_fp32(base_dir), ids, mask)
    out["logits_peft"], out["logits_merged_bf16"] = peft_and_merged(load_fp32(base_dir), adapter_dirs["adapter"],
                                                                    ids, mask)
    out["logits_rslora_peft"], out["logits_rslora_merged_bf16"] = peft_and_merged(
        load_fp32(base_dir), adapter_dirs["adapter_rslora"], ids, mask)
    out["logits_nf4_peft"], out["logits_nf4_merged_bf16"] = peft_and_merged(
        nf4_round_trip(load_fp32(base_dir)), adapter_dirs["adapter"], ids, mask)
    save_file(out, os.path.join(OUT, "golden.safetensors"))

    def gap(a, b):
        return (out[a] - out[b]).abs().max().item()

    print(f"adapter moves logits by {gap('logits_peft', 'logits_base'):.3f}; "
          f"bf16 merge rounding moves them by {gap('logits_merged_bf16', 'logits_peft'):.2e}")
    print(f"rslora adapter moves logits by {gap('logits_rslora_peft', 'logits_base'):.3f}; "
          f"bf16 rounding {gap('logits_rslora_merged_bf16', 'logits_rslora_peft'):.2e}")
    print(f"NF4 base moves logits by {gap('logits_nf4_peft', 'logits_peft'):.3f}; "
          f"bf16 rounding {gap('logits_nf4_merged_bf16', 'logits_nf4_peft'):.2e}")
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"tests/data/merge: {total / 1024:.0f} KiB")
    assert total < 1024 * 1024, "keep the merge golden data under 1 MiB"


if __name__ == "__main__":
    main()
