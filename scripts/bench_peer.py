#!/usr/bin/env python3
"""The peer of bench/bench_train (docs/performance.md): the same training step with
transformers + PEFT + bitsandbytes on the same GPU, eager and with the PEFT model
wrapped in torch.compile.

Llama-3.2-1B architecture (its config.json values; Llama-3.1-8B, Qwen3-8B and
Qwen2.5-1.5B for the configurations that name them, MODELS below), random weights:
the model is built in bf16 by the family's transformers class, saved with
save_pretrained to a temporary folder (the GPU machine reaches no hub) and loaded
back with AutoModelForCausalLM the QLoRA way (NF4, double quant, bf16 compute),
then prepare_model_for_kbit_training (checkpointing, use_reentrant False), LoRA
r 16 / alpha 32 / dropout 0.05 on q,k,v,o, bitsandbytes' PagedAdamW8bit (lr 2e-4,
no weight decay), gradient clipping at 1.0 and bf16 autocast around the forward
(what the Hugging Face Trainer does with bf16=True and its default max_grad_norm).

One JSON object a line on stdout, per (configuration, mode):
  {"bench":"train","system":"hf-peft-bnb","mode":"eager","micro":2,"seq":512,
   "tokens_per_second":...,"peak_allocated_bytes":...,"peak_reserved_bytes":...}
or the same keys with "error" when that one failed. Progress goes to stderr.

Timing: `steps` optimizer steps on random token ids (labels = inputs); the first
2 are warm-up (torch.compile compiles there). Then a device synchronization, the
allocator's peak statistics reset, the timed steps, a synchronization. The peaks
are those of the timed steps (max_memory_allocated / max_memory_reserved), with
the model, adapter and optimizer state already resident and loading left out, as
bench_train measures; *_with_warmup_bytes keep the warm-up (and compilation).
Managed memory of the paged optimizer is outside the allocator, as for qlora.

  PYTHONPATH=$PWD/.whl/site python3 scripts/bench_peer.py [--quick] [--steps N]
      [--modes eager,compile] [--configs 2x512,4x1024,8x2048,all-linear-4x1024,no-ckpt-2x512,fp16-4x1024,8b-2x2048,
                               qwen3-8b-2x2048,qwen2.5-1.5b-4x1024]
      [--work DIR] [--jobs N] [--deadline SECONDS]

--tiny (a smoke test of the script, CPU or GPU): every model shrunk to 2 layers of hidden 128
in its own family (Qwen2's q/k/v biases and Qwen3's q/k norms stay), torch.optim.AdamW without
a GPU; e.g. --tiny --configs qwen3-8b-2x2048,qwen2.5-1.5b-4x1024 --modes eager --steps 3.

--jobs N (Note [warm-ups side by side]): every (configuration, mode) runs in its own process;
up to N of them warm up (load, compile, the warm-up steps) at the same time, and only when no
warm-up is left does each time its steps, one at a time, with the others idle. torch.compile's
warm-up (90-220 s a configuration on an H200) is mostly CPU work on one GPU that sits idle, so
side by side they take about as long as the slowest few, not their sum; the timed steps run
as they do one by one. --deadline (seconds from the start of the process, writing the random
models included) stops waiting for warm-ups then: what is ready is timed, the rest reads as an
error row.
"""

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback

WARMUP_STEPS = 2
CONFIGS = [(2, 512), (4, 1024), (8, 2048)]  # (micro, seq): the three 1B shapes of the comparison
# The comparison's other configurations, by the names bench_train uses: each changes one
# thing of the default (1B, q,k,v,o, checkpointing, bf16).
VARIANTS = {
    "all-linear-4x1024": dict(micro=4, seq=1024, all_linear=True),
    "no-ckpt-2x512": dict(micro=2, seq=512, checkpointing=False),
    "fp16-4x1024": dict(micro=4, seq=1024, fp16=True),
    "8b-2x2048": dict(micro=2, seq=2048, model="llama-3.1-8b"),
    # The other families (scripts/gpu.sh --suite families), at the default settings.
    "qwen3-8b-2x2048": dict(micro=2, seq=2048, model="qwen3-8b"),
    "qwen2.5-1.5b-4x1024": dict(micro=4, seq=1024, model="qwen2.5-1.5b"),
    "phi-4-mini-4x1024": dict(micro=4, seq=1024, model="phi-4-mini"),
    "gemma-3-4b-4x1024": dict(micro=4, seq=1024, model="gemma-3-4b"),
}
LR = 2e-4
MAX_GRAD_NORM = 1.0
SEED = 1234

# Llama-3.2-1B's published config.json.
LLAMA_32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
    bos_token_id=128000,
    eos_token_id=128001,
    use_cache=False,
)
# Llama-3.1-8B's published config.json (what differs from the 1B).
LLAMA_31_8B = dict(LLAMA_32_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# What Qwen/Qwen3-8B's and Qwen/Qwen2.5-1.5B's published config.json files share.
QWEN = dict(
    vocab_size=151936,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_dropout=0.0,
    use_sliding_window=False,
    initializer_range=0.02,
    bos_token_id=151643,
    use_cache=False,
)
# Qwen/Qwen3-8B's (q/k RMSNorm per head, no biases, untied).
QWEN3_8B = dict(QWEN, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=False,
                attention_bias=False, max_window_layers=36, eos_token_id=151645)
# Qwen/Qwen2.5-1.5B's (q, k, v with biases; head_dim = hidden / heads = 128; Qwen2Config has no
# head_dim key).
QWEN25_15B = dict(QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, max_position_embeddings=131072, tie_word_embeddings=True,
                  max_window_layers=28, eos_token_id=151643)
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1000000.0}
# Phi-4-mini without its LongRoPE factors, as qlora's preset (they change neither shapes nor work).
PHI4_MINI = dict(vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
                 original_max_position_embeddings=4096, partial_rotary_factor=0.75, rms_norm_eps=1e-5,
                 hidden_act="silu", tie_word_embeddings=True, sliding_window=262144, initializer_range=0.02,
                 bos_token_id=199999, eos_token_id=199999, pad_token_id=199999, use_cache=False)
PHI_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
GEMMA3_4B = dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                 sliding_window=1024, max_position_embeddings=131072, rms_norm_eps=1e-6,
                 hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, initializer_range=0.02,
                 bos_token_id=2, eos_token_id=1, pad_token_id=0, use_cache=False)
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
# model name (bench_train's preset) -> (transformers config class, causal LM class, values, RoPE)
MODELS = {
    "llama-3.2-1b": ("LlamaConfig", "LlamaForCausalLM", LLAMA_32_1B, ROPE),
    "llama-3.1-8b": ("LlamaConfig", "LlamaForCausalLM", LLAMA_31_8B, dict(ROPE, factor=8.0)),
    "qwen3-8b": ("Qwen3Config", "Qwen3ForCausalLM", QWEN3_8B, QWEN_ROPE),
    "qwen2.5-1.5b": ("Qwen2Config", "Qwen2ForCausalLM", QWEN25_15B, QWEN_ROPE),
    "phi-4-mini": ("Phi3Config", "Phi3ForCausalLM", PHI4_MINI, PHI_ROPE),
    "gemma-3-4b": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3_4B, GEMMA3_ROPE),
}
STARTED = time.monotonic()  # --deadline counts from here


def log(msg):
    print(f"bench_peer: {msg}", file=sys.stderr, flush=True)


def emit(obj):
    print(json.dumps(obj), flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the first configuration (micro 2, seq 512)")
    p.add_argument("--steps", type=int, default=12, help=f"steps per run, the first {WARMUP_STEPS} warm-up")
    p.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    p.add_argument("--configs", default="", help="comma-separated MICROxSEQ or names of VARIANTS, e.g. "
                   "2x512,8b-2x2048,qwen3-8b-2x2048")
    p.add_argument("--work", default="", help="folder for the saved random model (default: a temp dir)")
    p.add_argument("--jobs", type=int, default=1, help="warm-ups side by side in worker processes (1: in turn)")
    p.add_argument("--deadline", type=float, default=0, help="with --jobs: seconds until the timing starts anyway")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke test of the script itself
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # CONFIG:MODE, started by --jobs
    p.add_argument("--turns", default="", help=argparse.SUPPRESS)   # the folder of ready / go files
    a = p.parse_args()
    if a.jobs < 1:
        p.error("--jobs must be at least 1")
    if a.steps <= WARMUP_STEPS:
        p.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in a.modes:
        if m not in ("eager", "compile"):
            p.error(f"--modes: unknown mode {m!r} (eager, compile)")
    configs = [variant(f"{m}x{s}", micro=m, seq=s) for m, s in CONFIGS]
    if a.configs:
        configs = []
        for item in a.configs.split(","):
            if item in VARIANTS:
                configs.append(variant(item, **VARIANTS[item]))
                continue
            try:
                micro, seq = (int(x) for x in item.lower().split("x"))
            except ValueError:
                p.error(f"--configs: expected MICROxSEQ such as 2x512 or one of {', '.join(VARIANTS)}, got {item!r}")
            configs.append(variant(item, micro=micro, seq=seq))
    if a.quick:
        configs = configs[:1]
    a.config_list = configs
    return a


def variant(name, micro, seq, model="llama-3.2-1b", all_linear=False, checkpointing=True, fp16=False):
    return dict(name=name, micro=micro, seq=seq, model=model, all_linear=all_linear,
                checkpointing=checkpointing, fp16=fp16)


def model_config(tiny, model="llama-3.2-1b"):
    import transformers

    config_class, _, published, rope = MODELS[model]
    values = dict(published)
    if tiny:
        values.update(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
        if "head_dim" in values:
            values.update(head_dim=32)
        if "max_window_layers" in values:
            values.update(max_window_layers=2)
        if "pad_token_id" in values:
            values.update(pad_token_id=0)
    return getattr(transformers, config_class)(rope_parameters=dict(rope), **values)


def write_random_model(path, tiny, device, model_name):
    import torch
    import transformers

    torch.manual_seed(SEED)
    cfg = model_config(tiny, model_name)
    with torch.device(device):
        model = getattr(transformers, MODELS[model_name][1])(cfg)  # transformers' own random init
    model.to(torch.bfloat16)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


def attention_targets(model):
    """LoRA on q, k, v, o as PEFT names them for the family (Phi-3 fuses q|k|v in qkv_proj)."""
    return ["qkv_proj", "o_proj"] if model.startswith("phi") else ["q_proj", "k_proj", "v_proj", "o_proj"]


def load_qlora_model(path, device, v):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.float16 if v["fp16"] else torch.bfloat16
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(  # the class config.json names
        path,
        quantization_config=bnb_config,
        dtype=dtype,
        device_map={"": 0} if device == "cuda" else {"": "cpu"},
        attn_implementation="sdpa",
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=v["checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules="all-linear" if v["all_linear"] else attention_targets(v["model"]),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    return model


def make_optimizer(params, device):
    if device != "cuda":  # --tiny on a machine without a GPU: paged optimizers need CUDA
        import torch

        return torch.optim.AdamW(params, lr=LR, weight_decay=0.0), "torch.AdamW (no GPU)"
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(params, lr=LR, weight_decay=0.0), "bnb.PagedAdamW8bit"


def run_one(path, v, mode, steps, device, vocab, before_timing=None):
    import torch

    micro, seq = v["micro"], v["seq"]
    base = load_qlora_model(path, device, v)
    params = [p for p in base.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer, optimizer_name = make_optimizer(params, device)
    model = torch.compile(base) if mode == "compile" else base

    gen = torch.Generator(device=device).manual_seed(SEED + micro * 7919 + seq)
    batches = [torch.randint(0, vocab, (micro, seq), device=device, generator=gen) for _ in range(steps)]
    autocast = torch.autocast(device_type=device, dtype=torch.float16 if v["fp16"] else torch.bfloat16)
    # fp16: the Hugging Face Trainer's dynamic loss scaling (torch.amp.GradScaler).
    scaler = torch.amp.GradScaler(device) if v["fp16"] else None

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step(ids):
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(WARMUP_STEPS):
        step(batches[i])
    sync()
    warmup_seconds = time.perf_counter() - t0
    with_warmup_alloc = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    with_warmup_reserved = torch.cuda.max_memory_reserved() if device == "cuda" else 0
    if before_timing is not None:
        before_timing()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    losses = []
    t0 = time.perf_counter()
    for i in range(WARMUP_STEPS, steps):
        losses.append(step(batches[i]))
    sync()
    seconds = time.perf_counter() - t0
    losses = [float(x) for x in losses]  # after the clock: no extra synchronization inside the timing
    timed = steps - WARMUP_STEPS
    tokens = timed * micro * seq
    result = {
        "steps_timed": timed,
        "tokens_timed": tokens,
        "tokens_per_second": tokens / seconds,
        "step_seconds_mean": seconds / timed,
        "warmup_seconds": warmup_seconds,
        "loss_mean_timed": sum(losses) / len(losses),
        "loss_finite": all(math.isfinite(x) for x in losses),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else 0,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if device == "cuda" else 0,
        "peak_allocated_with_warmup_bytes": with_warmup_alloc,
        "peak_reserved_with_warmup_bytes": with_warmup_reserved,
        "trainable_params": trainable,
        "optimizer": optimizer_name,
    }
    del model, base, optimizer, params, batches
    return result


def free(device):
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()  # drop compiled graphs (and the model they hold) between runs
    except Exception:  # noqa: BLE001 - only a cleanup
        pass
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def row_head(args, v, mode):
    return {"bench": "train", "system": "hf-peft-bnb", "config": v["name"],
            "model": v["model"] if not args.tiny else "tiny", "mode": mode, "micro": v["micro"], "seq": v["seq"],
            "precision": "fp16" if v["fp16"] else "bf16", "gradient_checkpointing": v["checkpointing"],
            "lora": "r16 a32 " + ("all-linear" if v["all_linear"] else "q,k,v,o")}


def measure(args, work, v, mode, device, before_timing=None):
    """One (configuration, mode): its JSON row, with "error" when it failed."""
    row = row_head(args, v, mode)
    path = os.path.join(work, v["model"] + "-random")
    log(f"{mode} {v['name']}: {args.steps} steps ({WARMUP_STEPS} warm-up)")
    try:
        row.update(run_one(path, v, mode, args.steps, device, model_config(args.tiny, v["model"]).vocab_size,
                           before_timing))
    except Exception as e:  # noqa: BLE001 - one failed configuration must not stop the rest
        traceback.print_exc(file=sys.stderr)
        msg = f"{type(e).__name__}: {e}"
        row["error"] = msg if len(msg) < 2000 else msg[:2000] + " ..."
    return row


def ensure_models(args, work, device):
    for model in dict.fromkeys(v["model"] for v in args.config_list):
        path = os.path.join(work, model + "-random")
        if not os.path.exists(os.path.join(path, "config.json")):
            t0 = time.perf_counter()
            n = write_random_model(path, args.tiny, device, model)
            log(f"random model ({n:,} parameters, bf16) written to {path} in {time.perf_counter() - t0:.0f} s")


# Note [warm-ups side by side]
# The coordinator (--jobs N) starts one worker process per (configuration, mode), in the order
# given, keeping at most N of them in their warm-up. A worker loads, warms up (compiles), frees
# its cached blocks, writes TURNS/<key>.ready and waits for TURNS/<key>.go; then it resets the
# peak statistics, times its steps and prints its row. The coordinator hands out the turns in
# order once no worker is warming up (or at --deadline), one at a time: every timed step runs
# with the GPU and the CPUs otherwise idle. A worker whose coordinator dies exits.
def worker_main(args, device):
    name, mode = args.worker.rsplit(":", 1)
    v = next(c for c in args.config_list if c["name"] == name)
    key = f"{name}.{mode}"
    parent = os.getppid()

    def wait_for_turn():
        import torch

        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        open(os.path.join(args.turns, key + ".ready"), "w").close()
        go = os.path.join(args.turns, key + ".go")
        while not os.path.exists(go):
            if os.getppid() != parent:
                raise RuntimeError("the coordinator is gone")
            time.sleep(0.05)

    row = measure(args, args.work, v, mode, device, wait_for_turn)
    emit(row)
    return 0 if "error" not in row else 1


def coordinate(args, work):
    import signal
    import subprocess

    start = STARTED  # --deadline counts the random models' writing too
    turns = tempfile.mkdtemp(prefix="qlora-bench-peer-turns-")
    runs = [(v, mode) for v in args.config_list for mode in args.modes]
    procs = {}  # index -> Popen
    done = {}   # index -> row

    def key(i):
        return f"{runs[i][0]['name']}.{runs[i][1]}"

    def ready(i):
        return os.path.exists(os.path.join(turns, key(i) + ".ready"))

    def finish(i, timeout=None):
        out, _ = procs[i].communicate(timeout=timeout)
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if rows:
            done[i] = rows[-1]
        else:
            done[i] = dict(row_head(args, *runs[i]), error=f"worker exited with {procs[i].returncode} and no row")

    def stop_all(why):
        for i, p in procs.items():
            if i not in done:
                p.kill()
                p.wait()
                done[i] = dict(row_head(args, *runs[i]), error=why)

    def on_term(signum, frame):  # the caller's time limit: rows for what did not finish, then out
        stop_all("not timed: bench_peer was stopped (time limit)")
        for i in range(len(runs)):
            if i in done and not done[i].get("_emitted"):
                emit(done[i])
        sys.exit(1)

    signal.signal(signal.SIGTERM, on_term)
    base = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps), "--work", work, "--turns", turns,
            "--configs", ",".join(v["name"] for v in args.config_list)] + (["--tiny"] if args.tiny else [])
    late = lambda: args.deadline > 0 and time.monotonic() - start > args.deadline  # noqa: E731
    pending = list(range(len(runs)))
    while pending or any(i not in done and not ready(i) for i in procs):
        for i in list(procs):
            if i not in done and procs[i].poll() is not None:
                finish(i)
        warming = [i for i in procs if i not in done and not ready(i)]
        while pending and len(warming) < args.jobs and not late():
            i = pending.pop(0)
            procs[i] = subprocess.Popen(base + ["--worker", f"{runs[i][0]['name']}:{runs[i][1]}"],
                                        stdout=subprocess.PIPE, text=True)
            warming.append(i)
        if late():
            log(f"deadline ({args.deadline:.0f} s): timing what is ready")
            break
        time.sleep(0.2)
    log(f"warm-ups done after {time.monotonic() - start:.0f} s; timing one run at a time")
    for i in range(len(runs)):
        if i not in procs:
            done[i] = dict(row_head(args, *runs[i]), error="not run: the warm-ups reached --deadline first")
        elif i not in done and ready(i):
            open(os.path.join(turns, key(i) + ".go"), "w").close()
            finish(i)
        elif i not in done:
            procs[i].kill()
            finish(i)
            done[i] = dict(row_head(args, *runs[i]), error="not timed: its warm-up did not finish by --deadline")
        emit(done[i])
        done[i]["_emitted"] = True
    shutil.rmtree(turns, ignore_errors=True)
    return sum(1 for r in done.values() if "error" in r)


def main():
    args = parse_args()
    head = {"bench": "train", "system": "hf-peft-bnb", "model": "llama-3.2-1b" if not args.tiny else "tiny"}
    try:
        import torch
        import transformers
        import peft

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.worker:
            return worker_main(args, device)
        versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
        try:
            import bitsandbytes

            versions["bitsandbytes"] = bitsandbytes.__version__
        except Exception as e:  # noqa: BLE001 - reported, then every run fails with the reason
            versions["bitsandbytes"] = f"import failed: {e}"
        if device != "cuda" and not args.tiny:
            emit({**head, "skipped": "no GPU (torch.cuda.is_available() is False)", **versions})
            return 0
        emit({"bench": "train_device", "system": "hf-peft-bnb", "device": torch.cuda.get_device_name(0)
              if device == "cuda" else "cpu", "steps": args.steps, "warmup_steps": WARMUP_STEPS,
              "jobs": args.jobs, **versions})
    except Exception as e:  # noqa: BLE001
        emit({**head, "error": f"setup: {type(e).__name__}: {e}"})
        return 1

    work = args.work or tempfile.mkdtemp(prefix="qlora-bench-peer-")
    failures = 0
    try:
        ensure_models(args, work, device)
        free(device)
        if args.jobs > 1:
            failures = coordinate(args, work)
        else:
            for v in args.config_list:
                for mode in args.modes:
                    row = measure(args, work, v, mode, device)
                    failures += "error" in row
                    emit(row)
                    free(device)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
