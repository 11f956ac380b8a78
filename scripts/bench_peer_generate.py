"""The peer of bench/bench_generate: decoding with transformers + PEFT + bitsandbytes on the same
GPU, as a user tries a tuned model (`model.generate`).

The Llama-3.1-8B architecture with random weights (scripts/bench_peer.py writes it with the
family's transformers class and save_pretrained), loaded back the QLoRA way (NF4, double quant,
bf16 compute, sdpa attention), a PEFT LoRA r 16 / alpha 32 on q,k,v,o with both matrices drawn
(init_lora_weights=False, so the adapter computes something), eval mode, the KV cache on.
Random prompts of 256 tokens, 256 new tokens, greedy, no stop token (min_new_tokens), batch 1
and 8. Timing as bench_generate's (Note [decode timing and the bandwidth bound]): a run with
max_new_tokens=1 is the prefill; decode_tokens_per_second = batch x (new - 1) / (full - prefill),
each the median of three runs after a warm-up.

One JSON object a line on stdout:
  {"bench":"generate","system":"hf-peft-bnb","model":"llama-3.1-8b","batch":1,"prompt":256,
   "new_tokens":256,"prefill_seconds":...,"decode_seconds":...,"decode_tokens_per_second":...,
   "peak_allocated_bytes":...}

  python3 scripts/bench_peer_generate.py [--batches 1,8] [--prompt 256] [--new 256] [--work DIR]
  --tiny: a smoke test of the script (the model shrunk to 2 layers of hidden 128), CPU or GPU.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_peer  # noqa: E402  (the random model writer and the published shapes)


def emit(obj):
    print(json.dumps(obj), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.1-8b", choices=sorted(bench_peer.MODELS))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--work", default="")
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = a.work or tempfile.mkdtemp(prefix="qlora-peer-generate-")
    path = os.path.join(work, f"model-{a.model}{'-tiny' if a.tiny else ''}")
    try:
        t0 = time.time()
        if not os.path.exists(os.path.join(path, "config.json")):
            bench_peer.write_random_model(path, a.tiny, device, a.model)
        written = time.time() - t0
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map={"": 0} if device == "cuda" else {"": "cpu"},
                                                     attn_implementation="sdpa")
        model.config.use_cache = True
        torch.manual_seed(bench_peer.SEED)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          bias="none", task_type="CAUSAL_LM", init_lora_weights=False)
        model = get_peft_model(model, lora).eval()
        loaded = time.time() - t0 - written
        name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
        emit({"bench": "generate_device", "system": "hf-peft-bnb", "name": name, "model": a.model,
              "write_seconds": written, "load_seconds": loaded})
        vocab = model.config.vocab_size

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        def run(ids, new_tokens):
            sync()
            t = time.time()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
            sync()
            assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
            return time.time() - t

        gen = torch.Generator().manual_seed(7)
        for batch in (int(b) for b in a.batches.split(",") if b):
            row = {"bench": "generate", "system": "hf-peft-bnb", "model": a.model, "batch": batch,
                   "prompt": a.prompt, "new_tokens": a.new}
            try:
                ids = torch.randint(0, vocab, (batch, a.prompt), generator=gen).to(device)
                run(ids, 8)  # warm-up
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                prefill = statistics.median(run(ids, 1) for _ in range(3))
                full = statistics.median(run(ids, a.new) for _ in range(3))
                row.update(prefill_seconds=prefill, decode_seconds=full - prefill,
                           decode_tokens_per_second=batch * (a.new - 1) / (full - prefill))
                if device == "cuda":
                    row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            except Exception as e:  # one row's failure is that row's error
                row["error"] = f"{type(e).__name__}: {e}"
            emit(row)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
