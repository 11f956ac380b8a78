"""Parameter counts of every model preset as transformers + PEFT count them.

For each preset's published config.json shape (the same numbers as src/model/decoder_config.cpp's
preset table), builds the transformers model on the meta device (no memory, no download), counts
all parameters (tied embeddings once, as model.num_parameters() does) and attaches PEFT LoRA
r 16 on q,k,v,o and r 16 on all-linear to count what PEFT trains (print_trainable_parameters).

    .venv/bin/python scripts/golden/preset_params.py     # writes tests/data/model_configs/preset_params.json

Read by tests/test_model_families.cpp (PresetsCountLikePeft).
"""
import json
import pathlib

import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          Phi3Config, Qwen2Config, Qwen3Config)

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "model_configs" / "preset_params.json"

LLAMA3 = lambda f: {"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
# name: (config class, vocab, hidden, intermediate, layers, heads, kv heads, head_dim, tied, extra)
PRESETS = {
    "llama-3.2-1b": (LlamaConfig, 128256, 2048, 8192, 16, 32, 8, 64, True, {}),
    "llama-3.1-8b": (LlamaConfig, 128256, 4096, 14336, 32, 32, 8, 128, False, {}),
    "mistral-7b-v0.3": (MistralConfig, 32768, 4096, 14336, 32, 32, 8, 128, False, {"sliding_window": None}),
    "qwen2.5-0.5b": (Qwen2Config, 151936, 896, 4864, 24, 14, 2, 64, True, {}),
    "qwen2.5-1.5b": (Qwen2Config, 151936, 1536, 8960, 28, 12, 2, 128, True, {}),
    "qwen2.5-7b": (Qwen2Config, 152064, 3584, 18944, 28, 28, 4, 128, False, {}),
    "qwen3-0.6b": (Qwen3Config, 151936, 1024, 3072, 28, 16, 8, 128, True, {}),
    "qwen3-4b": (Qwen3Config, 151936, 2560, 9728, 36, 32, 8, 128, True, {}),
    "qwen3-8b": (Qwen3Config, 151936, 4096, 12288, 36, 32, 8, 128, False, {}),
    "qwen3-14b": (Qwen3Config, 151936, 5120, 17408, 40, 40, 8, 128, False, {}),
    "smollm2-135m": (LlamaConfig, 49152, 576, 1536, 30, 9, 3, 64, True, {}),
    "smollm2-360m": (LlamaConfig, 49152, 960, 2560, 32, 15, 5, 64, True, {}),
    "smollm2-1.7b": (LlamaConfig, 49152, 2048, 8192, 24, 32, 32, 64, True, {}),
    "gemma-2-2b": (Gemma2Config, 256000, 2304, 9216, 26, 8, 4, 256, True, {}),
    "gemma-2-9b": (Gemma2Config, 256000, 3584, 14336, 42, 16, 8, 256, True, {}),
    "gemma-3-270m": (Gemma3TextConfig, 262144, 640, 2048, 18, 4, 1, 256, True, {}),
    "gemma-3-1b": (Gemma3TextConfig, 262144, 1152, 6912, 26, 4, 1, 256, True, {}),
    "gemma-3-4b": (Gemma3TextConfig, 262208, 2560, 10240, 34, 8, 4, 256, True, {}),
    "gemma-3-12b": (Gemma3TextConfig, 262208, 3840, 15360, 48, 16, 8, 256, True, {}),
    "phi-3.5-mini": (Phi3Config, 32064, 3072, 8192, 32, 32, 32, 96, False, {}),
    "phi-4-mini": (Phi3Config, 200064, 3072, 8192, 32, 24, 8, 128, True, {"partial_rotary_factor": 0.75}),
    "phi-4": (Phi3Config, 100352, 5120, 17920, 40, 40, 10, 128, False, {}),
}


def count(cls, vocab, hidden, inter, layers, heads, kv, head_dim, tied, extra):
    cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
              **extra)
    out = {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    out["total"] = model.num_parameters()
    qkvo = ["qkv_proj", "o_proj"] if cls is Phi3Config else ["q_proj", "k_proj", "v_proj", "o_proj"]
    for name, targets in (("lora_qkvo_r16", qkvo), ("lora_all_r16", "all-linear")):
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(cfg)
        peft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
        out[name] = peft.get_nb_trainable_parameters()[0]
    return out


def main():
    result = {name: count(*row) for name, row in PRESETS.items()}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result.items():
        print(f"{name:16s} total {r['total']:>14,}  qkvo r16 {r['lora_qkvo_r16']:>12,}  all r16 {r['lora_all_r16']:>12,}")


if __name__ == "__main__":
    main()
