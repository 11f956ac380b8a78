"""Loads a model directory written by `qlora merge` with transformers and compares its logits
with the golden ones scripts/golden/merge.py computed from transformers + PEFT's own merge.

    .venv/bin/python scripts/check_merged_hf.py --merged OUT_DIR \
        --golden tests/data/merge/golden.safetensors --key logits_merged_bf16

Prints one JSON object: max_abs_diff (max |logits - golden[key]|, the forward in fp32 over the
stored 16-bit weights, as the golden was computed), dtype (what from_pretrained picks by default
from the merged config.json), tokenizer_loads (AutoTokenizer reads the copied tokenizer files).
Used by tests/test_lora_merge.cpp, which asserts the bound.
"""

import argparse
import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merged", required=True, help="the directory qlora merge wrote")
    ap.add_argument("--golden", required=True, help="golden.safetensors of scripts/golden/merge.py")
    ap.add_argument("--key", default="logits_merged_bf16", help="which golden logits to compare with")
    args = ap.parse_args()

    golden = load_file(args.golden)
    default = AutoModelForCausalLM.from_pretrained(args.merged)  # dtype from config.json
    model = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=golden["input_ids"], attention_mask=golden["attention_mask"]).logits.float()
    try:
        AutoTokenizer.from_pretrained(args.merged)
        tokenizer_loads = True
    except Exception:  # noqa: BLE001  (reported, the test decides)
        tokenizer_loads = False
    print(json.dumps({
        "max_abs_diff": (logits - golden[args.key]).abs().max().item(),
        "dtype": str(next(default.parameters()).dtype),
        "tokenizer_loads": tokenizer_loads,
    }))


if __name__ == "__main__":
    main()
