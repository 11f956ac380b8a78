"""Writes tests/data/model_configs/*.json with transformers' own config classes.

The planner and the model loader read Hugging Face config.json files. These
files are what transformers itself writes today (transformers 5 folds
rope_theta and rope_scaling into rope_parameters) for the published shapes of
Llama-3.2-1B, Llama-3.1-8B, Llama-2-7B and Mistral-7B, so the C++ reader is
tested on real output, not on files written by hand. The files in the older
format (transformers 4, as most checkpoints on the Hub still carry) are
written beside them: hf4_*.json.

    .venv/bin/python scripts/golden/model_configs.py
"""
import json
import pathlib

import transformers
from transformers import LlamaConfig, MistralConfig

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "model_configs"

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

SHAPES = {
    "llama-3.2-1b": (LlamaConfig, dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                        head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                        tie_word_embeddings=True, theta=500000.0,
                                        scaling=dict(LLAMA3_ROPE, factor=32.0))),
    "llama-3.1-8b": (LlamaConfig, dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                        head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                        tie_word_embeddings=False, theta=500000.0,
                                        scaling=dict(LLAMA3_ROPE, factor=8.0))),
    "llama-2-7b": (LlamaConfig, dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                      max_position_embeddings=4096, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False, theta=10000.0, scaling=None)),
    "mistral-7b": (MistralConfig, dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                        max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
                                        tie_word_embeddings=False, theta=10000.0, scaling=None)),
}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (cls, kw) in SHAPES.items():
        kw = dict(kw)
        theta, scaling = kw.pop("theta"), kw.pop("scaling")
        rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else dict(scaling, rope_theta=theta)
        cfg = cls(rope_parameters=rope, **kw)
        d = json.loads(cfg.to_json_string(use_diff=True))  # what save_pretrained writes
        (OUT / f"{name}.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        # The transformers 4 layout of the same shapes.
        old = {k: v for k, v in d.items() if k not in ("rope_parameters", "dtype")}
        old["rope_theta"] = theta
        old["rope_scaling"] = None if scaling is None else dict(scaling)
        old["torch_dtype"] = "bfloat16"
        (OUT / f"hf4_{name}.json").write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
        print("wrote", name, "with transformers", transformers.__version__)


if __name__ == "__main__":
    main()
