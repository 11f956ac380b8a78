"""Golden data for other decoder families: tiny random Qwen2, Qwen3, Mistral, SmolLM2,
Llama-with-RoPE-scaling, Gemma 2, Gemma 3 and Phi-3 models (scripts/golden/family_variants.py)
run by transformers + PEFT + bitsandbytes. From the repository root (CPU, deterministic, ~30 s):

    .venv/bin/python scripts/golden/families.py [--only gemma2,gemma3]   # writes tests/data/families/

bitsandbytes comes from the venv or $BNB_SITE (default /tmp/bnbsite: `pip install --no-deps
--target /tmp/bnbsite bitsandbytes-0.50.2-*.whl`). Each model is randomized as
scripts/golden/model.py does (norm weights 1 + 0.3 N(0,1), q_norm / k_norm included; embeddings
0.25 N(0,1); other matrices N(0,1)/sqrt(fan_in)) plus biases 0.5 N(0,1), and saved in fp32.
Gemma's (1 + w) norms get the same draws minus 1; Gemma runs with attn_implementation "eager"
(SDPA drops attn_logit_softcapping). Variants, files and keys: tests/data/families/README.md.
"""

import argparse
import json
import math
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from peft import PeftModel

try:
    import bitsandbytes  # noqa: F401
except ImportError:
    # The wheel unpacked beside the venv (pip install --no-deps --target DIR bitsandbytes-*.whl).
    sys.path.insert(0, os.environ.get("BNB_SITE", "/tmp/bnbsite"))
    import bitsandbytes  # noqa: F401
import bitsandbytes.functional as bnbf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model as golden_model  # noqa: E402  (randomize, make_batch, lora_step, check_adapters: the same conventions)
import quant as golden_quant  # noqa: E402  (nested_absmax, dequant: the names tests/test_quant_nf4.cpp reads)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "data", "families")
VOCAB = golden_model.VOCAB
from family_variants import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
SEGMENTS = [9, 8, 7]  # the packed row: three examples back to back, 24 tokens
MERGE_TOL = 1e-5  # --check-merged (fp32)
PACKED_TOL = 1e-5  # transformers' packed forward vs the segments run one by one
SOFTCAP_MIN_FRACTION = 0.05  # of pre-cap values beyond cap / 2: the cap must bend a fair share of them

# The variants (config, LoRA, hub spelling): scripts/golden/family_variants.py.
from family_variants import NF4_WEIGHTS, VARIANTS  # noqa: E402


# ---------------------------------------------------------------- weights and config.json

def write_hub_config(d, hub):
    """Rewrites the config.json save_pretrained wrote (transformers 5: rope_parameters, dtype,
    layer_types) in the spelling of the family's published checkpoints."""
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    if hub.get("rope_local"):  # Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}
        local = rope["sliding_attention"]
        assert set(local) == {"rope_type", "rope_theta"} and local["rope_type"] == "default", local
        cfg["rope_local_base_freq"] = local["rope_theta"]
        rope = rope["full_attention"]
    cfg["rope_theta"] = rope["rope_theta"]
    for key in hub.get("rope_top", []):  # Phi-3: already at the top level, where its files keep them
        assert cfg[key] == rope.pop(key), (key, cfg[key])
    if hub["rope_scaling"] == "null":
        cfg["rope_scaling"] = None
    elif hub["rope_scaling"] is not None:
        cfg["rope_scaling"] = hub["rope_scaling"]
        want = {k: v for k, v in rope.items() if k != "rope_theta"}
        got = dict(hub["rope_scaling"])
        got["rope_type"] = got.pop("type", got.get("rope_type"))
        assert got == want, (got, want)
    else:
        assert rope["rope_type"] == "default", rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    for key in hub["drop"]:
        cfg.pop(key)
    cfg.update(hub["set"])
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def comparable(config):
    d = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"):
        d.pop(key, None)
    if isinstance(d.get("rope_parameters"), dict):
        d["rope_parameters"] = {k: v for k, v in d["rope_parameters"].items() if k != "type"}
    return d


BASES = OUT  # where load_base finds <variant>/ (--base changes it for the reverse checks)


def load_base(name):
    spec = VARIANTS[name]
    model = spec["model"].from_pretrained(os.path.join(BASES, name), dtype=torch.float32,
                                          **spec.get("load", {})).eval()
    if "load" in spec:
        assert model.config._attn_implementation == spec["load"]["attn_implementation"], name
    return model


def randomize(name, model, seed):
    """golden/model.py's randomize(); for Gemma, whose RMSNorm multiplies by (1 + w), the norm
    weights drawn around 1 are moved to around 0 (w = draw - 1), so that the scale 1 + w is
    random around 1 and a norm computed as w instead of (1 + w) is far off."""
    golden_model.randomize(model, seed)
    if VARIANTS[name].get("gemma_norms"):
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.sub_(1.0)


def rope_state(rotary):
    """(inv_freq, attention_scaling) of the rotary embedding that rope_theta / rope_scaling of
    config.json describe: the model's only one, or Gemma 3's full-attention one."""
    if hasattr(rotary, "inv_freq"):
        return rotary.inv_freq, rotary.attention_scaling
    return rotary.full_attention_inv_freq, rotary.full_attention_attention_scaling


def make_model(name, d, vocab):
    """A model directory of variant `name` with `vocab` rows, transformers' own random init
    scaled as golden/model.py's randomize() does, config.json spelled as the family's
    checkpoints spell it, and no special token ids (the tokenizer put beside it brings its own):
    what the end-to-end training tests train on."""
    spec = VARIANTS[name]
    torch.manual_seed(spec["seed"])
    cfg = spec["config"]()
    cfg.vocab_size = vocab
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    built = spec["model"](cfg).float().eval()
    randomize(name, built, spec["seed"])
    golden_model.save_model(built, d)
    write_hub_config(d, spec["hub"])
    print(f"wrote {d}: {name}, vocab {vocab}")
    return 0


def layer_windows(config):
    """Per layer: the sliding window transformers applies (0 = full causal attention)."""
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral: every layer slides when sliding_window is set; Llama: none
        return [getattr(config, "sliding_window", None) or 0] * config.num_hidden_layers
    return [config.sliding_window if t == "sliding_attention" else 0 for t in types]


# ---------------------------------------------------------------- batches

def make_packed():
    g = torch.Generator().manual_seed(8)
    n = sum(SEGMENTS)
    ids = torch.randint(3, VOCAB, (1, n), generator=g)
    pos = torch.cat([torch.arange(s) for s in SEGMENTS]).unsqueeze(0)
    seg = torch.cat([torch.full((s,), i, dtype=torch.int64) for i, s in enumerate(SEGMENTS)]).unsqueeze(0)
    labels = ids.clone()
    labels[pos == 0] = -100  # a segment's first token is no target: nothing predicts across a boundary
    return ids, pos, seg, labels


def segment_bounds():
    out, start = [], 0
    for s in SEGMENTS:
        out.append((start, start + s))
        start += s
    return out


# ---------------------------------------------------------------- base model and golden.safetensors

def make_base(name):
    spec = VARIANTS[name]
    seed = spec["seed"]
    torch.manual_seed(seed)
    built = spec["model"](spec["config"]()).float().eval()
    randomize(name, built, seed)
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    golden_model.save_model(built, d)
    write_hub_config(d, spec["hub"])

    # Everything below comes from the directory as written: transformers' reading of that config.json.
    loaded = AutoConfig.from_pretrained(d)
    assert type(loaded) is type(built.config), type(loaded)
    assert comparable(loaded) == comparable(built.config), (comparable(loaded), comparable(built.config))
    model = load_base(name)
    saved = built.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    windows = layer_windows(model.config)
    rotary = model.model.rotary_emb
    inv_freq_init = rope_state(rotary)[0].detach().clone()

    ids, mask, out, batch = golden_model.golden_forward(model)
    # After the forward: dynamic RoPE recomputes inv_freq when max(position_ids) + 1 exceeds
    # max_position_embeddings, and keeps the new buffer.
    inv_freq = rope_state(rotary)[0].detach().float().clone()
    attention_scaling = float(rope_state(rotary)[1])
    extra = {}
    if hasattr(rotary, "sliding_attention_inv_freq"):  # Gemma 3: the sliding layers' own RoPE
        extra["inv_freq_sliding"] = rotary.sliding_attention_inv_freq.detach().float().clone().contiguous()
        extra["attention_scaling_sliding"] = torch.tensor(float(rotary.sliding_attention_attention_scaling),
                                                          dtype=torch.float32)
        assert torch.equal(rotary.sliding_attention_original_inv_freq, rotary.sliding_attention_inv_freq)
    if getattr(model.config, "attn_logit_softcapping", None) or getattr(model.config, "final_logit_softcapping", None):
        check_softcapping(name, model, ids, mask, out.logits)
    if rotary.rope_type == "longrope":
        extra.update(longrope_state(name, model, inv_freq_init, inv_freq))

    if any(windows):
        check_window_rule(name, out.logits, mask)
    packed = make_packed_golden(name)
    if rotary.rope_type == "longrope":  # the packed row's L = 9 <= original_max_position_embeddings
        assert torch.equal(packed["packed_inv_freq"], extra["inv_freq_short"]), name
    tensors = {
        **batch,
        "inv_freq": inv_freq.contiguous(),
        "inv_freq_init": inv_freq_init.float().contiguous(),
        "attention_scaling": torch.tensor(attention_scaling, dtype=torch.float32),
        "layer_window": torch.tensor(windows, dtype=torch.int64),
        "logits_nf4": nf4_logits(name, ids, mask),
        **packed,
        **extra,
    }
    save_file(tensors, os.path.join(d, "golden.safetensors"))
    print(f"wrote {d}: loss {out.loss.item():.6f}, |logits| max {out.logits.abs().max().item():.3f}, "
          f"windows {windows}, attention_scaling {attention_scaling:.6f}")


def longrope_state(name, model, inv_freq_init, inv_freq):
    """LongRoPE (modeling_rope_utils.py, _compute_longrope_parameters and dynamic_rope_update's
    longrope_frequency_update): both factor sets' frequencies as transformers computes them, checked
    against the buffers it used: at load time (short), after the padded forward (L = T = 12 >
    original_max_position_embeddings: long)."""
    cfg = model.config
    omax = cfg.rope_parameters["original_max_position_embeddings"]
    init = ROPE_INIT_FUNCTIONS["longrope"]
    short, scale_short = init(cfg, None)
    long, scale_long = init(cfg, None, seq_len=omax + 1)
    assert golden_model.T > omax >= max(SEGMENTS), (golden_model.T, omax)
    assert torch.equal(inv_freq_init, short) and torch.equal(inv_freq, long), name
    assert not torch.equal(short, long), name
    factor = cfg.max_position_embeddings / omax
    want = math.sqrt(1 + math.log(factor) / math.log(omax))
    assert scale_short == scale_long == model.model.rotary_emb.attention_scaling == want, (scale_short, want)
    print(f"{name}: longrope: padded batch L {golden_model.T} > {omax}: long factors; packed row L "
          f"{max(SEGMENTS)} <= {omax}: short factors; attention_scaling {want:.7f}")
    return {"inv_freq_short": short.float().contiguous(), "inv_freq_long": long.float().contiguous()}


def check_window_rule(name, logits, mask):
    """The window is "a query sees itself and the window - 1 tokens before it" (masking_utils:
    kv_idx > q_idx - sliding_window): on the full row 0 the logits equal those of an unbounded
    window up to position window - 1 and differ from position window on. A window of T or more
    (phi3_longrope's 262144, as Phi-3.5-mini's and Phi-4-mini's) cannot bind: the logits equal
    the unbounded window's everywhere."""
    d = os.path.join(OUT, name)
    cfg = AutoConfig.from_pretrained(d)
    w = cfg.sliding_window
    cfg.sliding_window = 10**6  # layer_types already fixed: the same layers slide, unboundedly
    wide = VARIANTS[name]["model"].from_pretrained(d, config=cfg, dtype=torch.float32,
                                                   **VARIANTS[name].get("load", {})).eval()
    with torch.no_grad():
        ref = wide(input_ids=golden_model.make_batch()[0], attention_mask=mask).logits
    assert int(mask[0].sum()) == golden_model.T
    if w >= golden_model.T:
        same = (logits - ref)[mask.bool()].abs().max().item()
        assert same < 1e-5, (name, same)
        return
    same = (logits[0, :w] - ref[0, :w]).abs().max().item()
    moved = (logits[0, w] - ref[0, w]).abs().max().item()
    assert same < 1e-5 and moved > 1e-3, (name, same, moved)


def check_softcapping(name, model, ids, mask, logits):
    """Gemma 2's soft caps, cap * tanh(x / cap), on the attention scores (eager_attention_forward:
    after the scaling, before the mask and the softmax) and on the final logits (after lm_head):
    prints the fraction of pre-cap values with |x| > cap / 2 (where tanh bends by > 7.5 %),
    asserts it is at least SOFTCAP_MIN_FRACTION, that the final cap is exactly where the
    logits come from, and that removing either cap moves the logits."""
    cfg = model.config
    valid = mask.bool()
    modeling = sys.modules[type(model).__module__]
    eager = modeling.eager_attention_forward
    scores = []

    def spy(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        k = modeling.repeat_kv(key, module.num_key_value_groups)
        s = torch.matmul(query, k.transpose(2, 3)) * scaling
        keep = (attention_mask == 0).expand_as(s) & valid[:, None, :, None].expand_as(s)
        scores.append(s[keep])
        return eager(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap, **kwargs)

    modeling.eager_attention_forward = spy
    try:
        with torch.no_grad():
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        modeling.eager_attention_forward = eager
    with torch.no_grad():
        z = model.lm_head(hidden)
    parts = []
    if cfg.attn_logit_softcapping:
        cap = cfg.attn_logit_softcapping
        s = torch.cat(scores)
        assert len(scores) == cfg.num_hidden_layers, len(scores)
        frac = (s.abs() > cap / 2).float().mean().item()
        parts.append(f"attention scores |s| > {cap / 2:g}: {frac:.1%} of {s.numel()} (max |s| {s.abs().max():.2f})")
        assert frac >= SOFTCAP_MIN_FRACTION, (name, "attention", frac)
    if cfg.final_logit_softcapping:
        cap = cfg.final_logit_softcapping
        zv = z[valid]
        frac = (zv.abs() > cap / 2).float().mean().item()
        parts.append(f"final logits |z| > {cap / 2:g}: {frac:.1%} of {zv.numel()} (max |z| {zv.abs().max():.2f})")
        assert frac >= SOFTCAP_MIN_FRACTION, (name, "final", frac)
        capped = cap * torch.tanh(z / cap)
        assert (capped - logits).abs().max().item() < 1e-6, "the final cap is not cap * tanh(lm_head / cap)"
    moved = []
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        cap = getattr(cfg, key)
        if not cap:
            continue
        # The attention modules copy attn_logit_softcapping at construction; the final cap is read
        # from the config at each forward.
        owners = [m for m in model.modules() if hasattr(m, key) and m is not cfg] + [cfg]
        for m in owners:
            setattr(m, key, None)
        try:
            with torch.no_grad():
                uncapped = model(input_ids=ids, attention_mask=mask).logits
        finally:
            for m in owners:
                setattr(m, key, cap)
        diff = (uncapped - logits)[valid].abs().max().item()
        moved.append(f"without {key} logits move by {diff:.3f}")
        assert diff > 1e-2, (name, key, diff)
    print(f"{name}: soft-capping: " + "; ".join(parts + moved))


def make_packed_golden(name):
    ids, pos, seg, labels = make_packed()
    model = load_base(name)  # fresh: dynamic RoPE keeps state between calls
    rotary = model.model.rotary_emb
    with torch.no_grad():
        # use_cache=False: with a cache (the config's default, in train mode too) transformers
        # skips its packed-sequence detection and the row is one causal sequence.
        hf = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
        packed_inv_freq = rope_state(rotary)[0].detach().float().clone()
        # The oracle: each segment alone, with the frequencies of the packed call (for dynamic
        # RoPE, whose update is turned off here: a segment of <= 8 tokens alone would reset them).
        if isinstance(rotary.rope_type, str):  # Gemma 3: a dict a layer type, none of them dynamic
            rotary.rope_type = "default"
        parts = [model(input_ids=ids[:, a:b], use_cache=False).logits for a, b in segment_bounds()]
    oracle = torch.cat(parts, dim=1).float()
    assert torch.equal(rope_state(rotary)[0], packed_inv_freq)
    err = (hf.logits.float() - oracle).abs().max().item()
    assert err <= PACKED_TOL, f"{name}: transformers' packed forward differs from the segments by {err}"
    s, n = golden_model.loss_sum_count(oracle, labels)
    assert abs(hf.loss.item() - (s / n).item()) < 1e-5
    return {
        "packed_input_ids": ids.contiguous(),
        "packed_position_ids": pos.contiguous(),
        "packed_segment_ids": seg.contiguous(),
        "packed_labels": labels.contiguous(),
        "packed_logits": oracle.contiguous(),
        "packed_logits_hf": hf.logits.float().contiguous(),
        "packed_loss_sum": s.float().reshape(()),
        "packed_loss_count": n.reshape(()).to(torch.int64),
        "packed_inv_freq": packed_inv_freq.contiguous(),
    }


# ---------------------------------------------------------------- NF4

def nf4_round_trip(w):
    """bitsandbytes' NF4 codes and double-quantized absmax of w, decoded in bitsandbytes' flat
    layout (block b = elements 64b..64b+63 of the flattened weight, as its CUDA kernels read them).
    bitsandbytes 0.50.2's CPU dequantize_4bit decodes a weight whose rows are not a multiple of 64
    long (smollm2's 48) block by row instead, which is not what a GPU computes; the codes and
    absmax it quantizes to are right (nf4.safetensors checks them)."""
    q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    absmax = golden_quant.nested_absmax(st).float()
    b = q.flatten()
    codes = torch.stack([b >> 4, b & 15], 1).flatten().long()[: w.numel()]
    return (st.code.float()[codes].view(-1, 64) * absmax.view(-1, 1)).view(w.shape).to(torch.float32)


def nf4_logits(name, ids, mask):
    """fp32 logits with every decoder projection (not lm_head) replaced by bitsandbytes' NF4
    round trip (blocksize 64, double quantization); biases kept."""
    model = load_base(name)
    with torch.no_grad():
        for mname, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and mname != "lm_head":
                mod.weight.data = nf4_round_trip(mod.weight.data)
        return model(input_ids=ids, attention_mask=mask).logits.float().contiguous()


def make_nf4(name):
    """Layer 0's q_proj and down_proj (Phi-3: qkv_proj, gate_up_proj and down_proj) in
    tests/data/quant's layout (golden/quant.py add_case)."""
    sd = load_base(name).state_dict()
    out = {}
    for key in VARIANTS[name].get("nf4", NF4_WEIGHTS):
        x = sd[key].float().contiguous()
        packed, st = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
        packed_n, st_n = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(packed, packed_n)
        nested = golden_quant.nested_absmax(st_n)
        deq_nested = golden_quant.dequant(packed, nested, x.shape, torch.float32)
        assert torch.equal(nf4_round_trip(x), golden_quant.dequant(packed, nested, x.shape, torch.float32)) or \
            x.shape[1] % 64 != 0  # what logits_nf4 used (see nf4_round_trip)
        # Not stored, to keep the directory small: <key>.input (model.safetensors holds it under
        # the same name) and the dequantized weights (tests/data/quant checks dequantization bit
        # for bit; logits_nf4 checks it end to end).
        out.update({
            f"{key}.packed": packed.view(-1).contiguous(),
            f"{key}.absmax": st.absmax.contiguous(),
            f"{key}.absmax_q": st_n.absmax.contiguous(),
            f"{key}.absmax2": st_n.state2.absmax.contiguous(),
            f"{key}.offset": st_n.offset.reshape(1).float().contiguous(),
            f"{key}.absmax_deq": nested.contiguous(),
        })
    save_file(out, os.path.join(OUT, name, "nf4.safetensors"))


# ---------------------------------------------------------------- LoRA and merge

def base_for_peft(name):
    base = load_base(name)
    # Recorded in adapter_config.json: a path relative to the repository root, not this checkout's.
    base.name_or_path = base.config._name_or_path = os.path.relpath(os.path.join(OUT, name), ROOT)
    return base


def make_lora(name):
    spec = VARIANTS[name]
    model, out, grads = golden_model.lora_step(base_for_peft(name), spec["lora"](), spec["seed"] + 100)
    tensors = {
        "lora_logits": out.logits.detach().float().contiguous(),
        "lora_loss": out.loss.detach().float().reshape(()),
        **grads,
    }
    d = os.path.join(OUT, name, "lora")
    golden_model.save_lora(model, d, tensors)
    merged = peft_merged(name, os.path.join(d, "adapter"))
    base_sd = load_base(name).state_dict()
    changed = {k: v for k, v in merged.items() if not torch.equal(v, base_sd[k])}
    biases = {k: v for k, v in merged.items() if k.endswith(".bias")}
    assert all(torch.equal(v, base_sd[k]) for k, v in biases.items()), "merge changed a bias"
    assert all(k.endswith(".weight") and "_proj." in k for k in changed), sorted(changed)
    save_file({"merged." + k: v.float().contiguous() for k, v in sorted({**changed, **biases}.items())},
              os.path.join(d, "merged.safetensors"))
    print(f"wrote {d}: {len(grads)} LoRA gradients, loss {out.loss.item():.6f}, "
          f"{len(changed)} merged weights, {len(biases)} biases")


def peft_merged(name, adapter_dir):
    """PEFT's merge_and_unload() of the adapter in adapter_dir on the variant's fp32 base:
    the merged model's state_dict (tied lm_head left out, as save_pretrained leaves it out)."""
    base = load_base(name)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = model.merge_and_unload()
    sd = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    if merged.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


# ---------------------------------------------------------------- reverse checks

def check_adapter(root):
    return golden_model.check_adapters(root, {name: (lambda name=name: load_base(name)) for name in VARIANTS})


def check_merged(root):
    worst, found, bad = 0.0, 0, False
    for name in VARIANTS:
        path = os.path.join(root, name, "model.safetensors")
        if not os.path.isfile(path):
            print(f"{path}: missing")
            continue
        found += 1
        own = os.path.join(root, name, "adapter")  # the adapter qlora merged, when given beside it
        want = peft_merged(name, own if os.path.isdir(own) else os.path.join(OUT, name, "lora", "adapter"))
        base_sd = load_base(name).state_dict()
        got = load_file(path)
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if missing or extra:
            print(f"{name}: keys differ from PEFT's merged model: missing {missing}, unexpected {extra}")
            bad = True
        err, err_changed, n_changed = 0.0, 0.0, 0
        for k in sorted(set(want) & set(got)):
            if got[k].shape != want[k].shape:
                print(f"{name}: {k} has shape {list(got[k].shape)}, PEFT's {list(want[k].shape)}")
                bad = True
                continue
            e = (got[k].float() - want[k]).abs().max().item()
            err = max(err, e)
            if not torch.equal(want[k], base_sd[k]):
                err_changed = max(err_changed, e)
                n_changed += 1
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in got.values()})
        print(f"{name}: max |qlora merged - PEFT merge_and_unload| = {err:.3e} over {len(got)} tensors "
              f"({dtypes}); over the {n_changed} merged projections {err_changed:.3e}")
        if n_changed == 0:
            print("  the adapter changed no weight?")
            bad = True
        worst = max(worst, err)
    return golden_model.verdict(found == 0 or bad or worst > MERGE_TOL)


# ---------------------------------------------------------------- main

def dir_size(path):
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)


def check_generate(path):
    """--check-generate FILE: FILE holds qlora's greedy generations, a JSON list of {"variant",
    "adapter" (bool), "prompt" (ids), "max_new_tokens", "generated" (ids)}; each must equal
    transformers' generate (greedy, no stop token, the variant's own attention implementation)
    on tests/data/families/<variant> (with its lora/adapter through PEFT when "adapter")."""
    with open(path) as f:
        cases = json.load(f)
    bad = 0
    for c in cases:
        model = load_base(c["variant"])
        if c["adapter"]:
            model = PeftModel.from_pretrained(model, os.path.join(OUT, c["variant"], "lora", "adapter")).eval()
        ids = torch.tensor([c["prompt"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=c["max_new_tokens"], min_new_tokens=c["max_new_tokens"],
                                 eos_token_id=None, pad_token_id=PAD_ID)
        want = out[0, ids.shape[1]:].tolist()
        same = want == c["generated"]
        bad += not same
        print(f"{c['variant']}{' + adapter' if c['adapter'] else ''}: {len(want)} tokens "
              f"{'equal' if same else 'DIFFER: transformers ' + str(want) + ', qlora ' + str(c['generated'])}")
    return golden_model.verdict(bad > 0 or not cases)


def main():
    golden_model.fix_string_hashing()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-adapter", metavar="DIR", help="load qlora-written adapters from DIR/<variant>/ into PEFT")
    ap.add_argument("--check-merged", metavar="DIR",
                    help="compare DIR/<variant>/model.safetensors with PEFT's merge_and_unload")
    ap.add_argument("--check-generate", metavar="FILE",
                    help="compare qlora's greedy generations in FILE with transformers' generate")
    ap.add_argument("--only", nargs="+", metavar="VARIANT",
                    help="write these variants only (space or comma separated: " + ",".join(VARIANTS) + ")")
    ap.add_argument("--base", metavar="ROOT",
                    help="the checks' base models are ROOT/<variant>/ instead of tests/data/families/<variant>/")
    ap.add_argument("--make-model", nargs=3, metavar=("VARIANT", "DIR", "VOCAB"),
                    help="write a random model of VARIANT with VOCAB rows into DIR (end-to-end tests)")
    args = ap.parse_args()
    if args.only:
        args.only = [v for arg in args.only for v in arg.split(",") if v]
        unknown = [v for v in args.only if v not in VARIANTS]
        if unknown:
            ap.error(f"--only: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    global BASES
    if args.base:
        BASES = args.base
    if args.make_model:
        sys.exit(make_model(args.make_model[0], args.make_model[1], int(args.make_model[2])))
    torch.use_deterministic_algorithms(True)
    if args.check_adapter:
        sys.exit(check_adapter(args.check_adapter))
    if args.check_merged:
        sys.exit(check_merged(args.check_merged))
    if args.check_generate:
        sys.exit(check_generate(args.check_generate))
    os.makedirs(OUT, exist_ok=True)
    for name in args.only or VARIANTS:
        make_base(name)
        make_nf4(name)
        make_lora(name)
    for name in VARIANTS:
        if os.path.isdir(os.path.join(OUT, name)):
            print(f"  {name}: {dir_size(os.path.join(OUT, name)) / 1024:.0f} KiB")
    total = dir_size(OUT)
    print(f"tests/data/families: {total / 1024:.0f} KiB ({total} bytes)")


if __name__ == "__main__":
    main()
