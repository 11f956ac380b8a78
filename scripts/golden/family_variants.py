"""The variants of scripts/golden/families.py: each family's tiny model (its own config class and
*ForCausalLM in transformers 5), the LoRA config PEFT trains on it, and how its config.json is
rewritten to read like the family's published checkpoints. Imported by families.py; the variants,
files and keys are described in tests/data/families/README.md.
"""

from peft import LoraConfig
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import model as golden_model  # VOCAB

VOCAB = golden_model.VOCAB
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NF4_WEIGHTS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight")
# Phi-3 stores q, k, v as one qkv_proj and gate, up as one gate_up_proj, and bitsandbytes quantizes each
# fused matrix as one tensor: with in_features a multiple of 64 every 64-element block stays inside one row
# (so inside q, k or v; gate or up), but double quantization's offset (the mean of all block absmax) and
# its groups of 256 blocks span the whole fused matrix.
NF4_WEIGHTS_PHI3 = ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight",
                    "model.layers.0.mlp.down_proj.weight")

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_qkvo():
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=QKVO, task_type="CAUSAL_LM")


def lora_phi3_qkvo():
    # Phi-3's attention projections: the fused q|k|v matrix and o_proj.
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["qkv_proj", "o_proj"],
                      task_type="CAUSAL_LM")


def lora_all_rslora():
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", use_rslora=True,
                      task_type="CAUSAL_LM")


COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, pad_token_id=PAD_ID,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID)

# phi3_longrope: original_max_position_embeddings below the padded batch's length (T = 12) and at or
# above the packed row's (max position 8 -> 9), so that transformers' LongRoPE, which picks its factor
# set by max(position_ids) + 1 at every forward, runs the padded batch on long_factor and the packed
# row on short_factor. max_position_embeddings / original = 32, the ratio of Phi-3.5-mini and
# Phi-4-mini (131072 / 4096). One factor per rotary frequency: head_dim 16 * 0.75 / 2 = 6.
PHI3_LONGROPE_OMAX = 10
PHI3_SHORT_FACTOR = [1.0, 1.02, 1.05, 1.1, 1.25, 1.5]
PHI3_LONG_FACTOR = [1.0, 1.5, 3.0, 7.5, 16.0, 40.0]

# config: the family's own config class, built with transformers 5's rope_parameters.
# hub: how config.json is rewritten after save_pretrained so that it reads like the family's
# published checkpoints (rope_theta at the top level, rope_scaling as those files spell it;
# rope_local: Gemma 3's per-layer-type rope_parameters as rope_theta + rope_scaling for the
# full-attention layers and rope_local_base_freq for the sliding ones).
# rope_top: keys of rope_parameters that the published files keep at the top level beside rope_scaling
# (Phi-3: partial_rotary_factor, original_max_position_embeddings).
# load: from_pretrained's extra arguments. gemma_norms: RMSNorm weights stored as w of (1 + w).
# nf4: the weights nf4.safetensors holds (NF4_WEIGHTS unless given).
EAGER = dict(attn_implementation="eager")  # the only implementation that applies attn_logit_softcapping
VARIANTS = {
    "qwen2": dict(
        seed=31, model=Qwen2ForCausalLM, lora=lora_qkvo,
        config=lambda: Qwen2Config(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
            tie_word_embeddings=True, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
            rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **COMMON),
        hub=dict(drop=["layer_types"], set={"sliding_window": 4096}, rope_scaling=None)),
    "qwen2_window": dict(
        seed=32, model=Qwen2ForCausalLM, lora=lora_qkvo,
        config=lambda: Qwen2Config(
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            tie_word_embeddings=False, use_sliding_window=True, sliding_window=5, max_window_layers=1,
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0,
                                 original_max_position_embeddings=4096),
            **COMMON),
        hub=dict(drop=["layer_types"], set={},
                 rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})),
    "qwen3": dict(
        seed=33, model=Qwen3ForCausalLM, lora=lora_all_rslora,
        config=lambda: Qwen3Config(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=40960, tie_word_embeddings=True, attention_bias=False,
            use_sliding_window=False, sliding_window=None, max_window_layers=28, rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **COMMON),
        hub=dict(drop=["layer_types"], set={}, rope_scaling="null")),
    "mistral": dict(
        seed=34, model=MistralForCausalLM, lora=lora_qkvo,
        config=lambda: MistralConfig(
            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=32768, tie_word_embeddings=False, sliding_window=5, rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0), **COMMON),
        hub=dict(drop=[], set={}, rope_scaling=None)),
    "smollm2": dict(
        seed=35, model=LlamaForCausalLM, lora=lora_all_rslora,
        # SmolLM2-135M / 360M group 3 query heads per kv head (9/3, 15/5); LlamaConfig wants
        # hidden_size % heads == 0, so this one is 48 wide: 6 heads of 8, 2 kv heads.
        config=lambda: LlamaConfig(
            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
            max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="default", rope_theta=100000.0),
            is_llama_config=True, rope_interleaved=False, **{**COMMON, "hidden_size": 48}),
        hub=dict(drop=["head_dim"], set={}, rope_scaling="null")),
    "llama_linear": dict(
        seed=36, model=LlamaForCausalLM, lora=lora_qkvo,
        config=lambda: LlamaConfig(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0), **COMMON),
        hub=dict(drop=[], set={}, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_dynamic": dict(
        seed=37, model=LlamaForCausalLM, lora=lora_qkvo,
        config=lambda: LlamaConfig(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8,
            tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0), **COMMON),
        hub=dict(drop=[], set={}, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "gemma2": dict(
        seed=38, model=Gemma2ForCausalLM, lora=lora_qkvo, load=EAGER, gemma_norms=True,
        # Gemma2Config's layer_types: layer i slides iff (i + 1) % 2, i.e. [sliding, full] * 2.
        # query_pre_attn_scalar 24 != head_dim 16; soft caps small enough to bend random logits.
        # hidden_act and cache_implementation: keys Gemma 2's config.json files carry beside
        # hidden_activation (transformers keeps them as plain attributes).
        config=lambda: Gemma2Config(
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            query_pre_attn_scalar=24, max_position_embeddings=8192, tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", sliding_window=5,
            attn_logit_softcapping=2.0, final_logit_softcapping=3.0, rms_norm_eps=1e-6,
            cache_implementation="hybrid", rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            **EAGER, **COMMON),
        hub=dict(drop=["layer_types", "tie_word_embeddings", "use_bidirectional_attention"], set={},
                 rope_scaling=None)),
    "gemma3": dict(
        seed=39, model=Gemma3ForCausalLM, lora=lora_all_rslora, load=EAGER, gemma_norms=True,
        # sliding_window_pattern 3: layer i slides iff (i + 1) % 3 -> [sliding, sliding, full].
        # One kv head (multi-query attention, as Gemma 3 270M / 1B). Linear RoPE scaling on the
        # full-attention layers only, as Gemma 3 4B / 12B / 27B.
        config=lambda: Gemma3TextConfig(
            num_hidden_layers=3, sliding_window_pattern=3, num_attention_heads=4, num_key_value_heads=1,
            head_dim=16, query_pre_attn_scalar=24, max_position_embeddings=131072, tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh", sliding_window=5, attn_logit_softcapping=None,
            final_logit_softcapping=None, rms_norm_eps=1e-6, cache_implementation="hybrid",
            rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1000000.0, factor=8.0),
                             "sliding_attention": dict(rope_type="default", rope_theta=10000.0)},
            **EAGER, **COMMON),
        hub=dict(drop=["layer_types", "_sliding_window_pattern", "tie_word_embeddings",
                       "use_bidirectional_attention"], set={},
                 rope_local=True, rope_scaling={"factor": 8.0, "rope_type": "linear"})),
    "phi3": dict(
        seed=40, model=Phi3ForCausalLM, lora=lora_phi3_qkvo, nf4=NF4_WEIGHTS_PHI3,
        # Phi-4-mini's attention shape scaled down: GQA (2 kv heads), head_dim 16 = hidden / heads (Phi3Config
        # has no head_dim), rotary on the first 0.75 * 16 = 12 dims of each head. Fused qkv_proj
        # [(4 + 2 + 2) * 16, 64] and gate_up_proj [2 * 128, 64], no biases. sliding_window 5 on every layer
        # (Phi3Model masks with it whenever it is not null, as Phi-3-mini-4k's 2047 binds inside 4096).
        config=lambda: Phi3Config(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            original_max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5,
            hidden_act="silu", sliding_window=5, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
            partial_rotary_factor=0.75,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75),
            **COMMON),
        hub=dict(drop=[], set={}, rope_scaling="null", rope_top=["partial_rotary_factor"])),
    "phi3_longrope": dict(
        seed=41, model=Phi3ForCausalLM, lora=lora_all_rslora, nf4=NF4_WEIGHTS_PHI3,
        # Phi-4-mini-instruct's layout: LongRoPE spelled {"long_factor", "short_factor", "type": "longrope"}
        # with original_max_position_embeddings and partial_rotary_factor at the top level, tied lm_head,
        # GQA, sliding_window 262144 (set, never binding).
        config=lambda: Phi3Config(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=32 * PHI3_LONGROPE_OMAX, original_max_position_embeddings=PHI3_LONGROPE_OMAX,
            tie_word_embeddings=True, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=262144,
            resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, partial_rotary_factor=0.75,
            rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                                 short_factor=list(PHI3_SHORT_FACTOR), long_factor=list(PHI3_LONG_FACTOR),
                                 original_max_position_embeddings=PHI3_LONGROPE_OMAX),
            **COMMON),
        hub=dict(drop=[], set={}, rope_top=["partial_rotary_factor", "original_max_position_embeddings"],
                 rope_scaling={"long_factor": list(PHI3_LONG_FACTOR), "short_factor": list(PHI3_SHORT_FACTOR),
                               "type": "longrope"})),
}
