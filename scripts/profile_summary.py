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
    gaps = idle_gaps(events, args.top)
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
        "gpu_idle": gaps,
    }, indent=1))


def idle_gaps(events, top, min_us=20.0):
    """Where the GPU waits for the host: the gaps of at least min_us between GPU work (kernels,
    copies, memsets, merged over streams), summed by the innermost CPU op (and the outermost
    one) running on the launching thread when each gap began, and by the CUDA runtime call
    in flight then (a synchronization names the op that waited)."""
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not gpu:
        return {}
    busy_end = gpu[0][1]
    gaps = []
    for start, end in gpu[1:]:
        if start - busy_end >= min_us:
            gaps.append((busy_end, start))
        busy_end = max(busy_end, end)
    ops = sorted(((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "cpu_op"),
                 key=lambda x: (x[0], -x[1]))
    rt = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver"))
    import bisect

    op_starts = [o[0] for o in ops]
    rt_starts = [r[0] for r in rt]

    def around(t, items, starts):
        inner, outer = None, None
        i = bisect.bisect_right(starts, t)
        for k in range(i - 1, max(-1, i - 4000), -1):  # scan back over recent ops
            s0, e0, name = items[k]
            if s0 <= t < e0:
                if inner is None or s0 >= inner[0]:
                    inner = (s0, name) if inner is None else inner
                outer = (s0, name)
        return (inner[1] if inner else "-"), (outer[1] if outer else "-")

    by_inner, by_outer, by_rt = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0.0
    for g0, g1 in gaps:
        d = g1 - g0
        total += d
        inner, outer = around(g0, ops, op_starts)
        by_inner[inner[:100]] += d
        by_outer[outer[:100]] += d
        by_rt[around(g0, rt, rt_starts)[0][:60]] += d
    rows = lambda c: [{"name": n, "us": round(v, 1)} for n, v in c.most_common(top)]  # noqa: E731
    return {"gaps": len(gaps), "idle_us": round(total, 1), "min_gap_us": min_us,
            "by_innermost_cpu_op": rows(by_inner), "by_outermost_cpu_op": rows(by_outer),
            "by_runtime_call": rows(by_rt)}


if __name__ == "__main__":
    main()
