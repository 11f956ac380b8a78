#!/usr/bin/env python3
"""Summarize a Kineto chrome trace (bench_train --profile, or torch.profiler's export).

    python3 scripts/profile_summary.py trace.json [--top 20]

Prints one JSON object: the traced span, GPU busy time (sum of kernel, memcpy and memset
durations on the GPU), how many kernels ran, the top kernels by total time, the CUDA runtime
calls by total time (launch counts show the per-kernel host overhead; synchronizations show the
host waiting on the device), and the top CPU ops by total time.
"""
import argparse
import collections
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    with open(args.trace) as f:
        trace = json.load(f)
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if not events:
        print(json.dumps({"trace": args.trace, "error": "no complete events"}))
        return
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)

    def table(cat_names):
        total = collections.Counter()
        count = collections.Counter()
        for e in events:
            if e.get("cat") in cat_names:
                total[e["name"]] += e["dur"]
                count[e["name"]] += 1
        rows = [{"name": n[:120], "us": round(t, 1), "count": count[n]} for n, t in total.most_common(args.top)]
        return sum(total.values()), sum(count.values()), rows

    gpu_us, gpu_n, kernels = table({"kernel", "gpu_memcpy", "gpu_memset"})
    rt_us, rt_n, runtime = table({"cuda_runtime", "cuda_driver"})
    cpu_us, cpu_n, cpu_ops = table({"cpu_op"})
    print(json.dumps({
        "trace": args.trace,
        "span_us": round(end - start, 1),
        "gpu_busy_us": round(gpu_us, 1),
        "gpu_busy_fraction": round(gpu_us / max(end - start, 1e-9), 3),
        "gpu_events": gpu_n,
        "top_gpu": kernels,
        "runtime_calls": rt_n,
        "top_runtime": runtime,
        "cpu_ops": cpu_n,
        "top_cpu_ops_inclusive": cpu_ops,
    }, indent=1))


if __name__ == "__main__":
    main()
