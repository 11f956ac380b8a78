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
    ap.add_argument("--timeline", help="also write the trainer's phases and the GPU's idle gaps "
                    "(>= 2 us, with the CPU op in flight) in time order to this JSON file")
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

    if args.timeline:
        write_timeline(events, args.timeline)
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
        "gpu_idle_by_phase": idle_by_phase(events),
        "host_waits": host_waits(events, args.top),
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


def host_waits(events, top):
    """Where the host waits on the GPU: every cudaStreamSynchronize / cudaDeviceSynchronize /
    cudaMemcpy* runtime call, counted by the stack of CPU ops around it on its thread
    (outermost first, at most four deep), with the time spent in the call."""
    calls = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
             and ("Synchronize" in e["name"] or "Memcpy" in e["name"])]
    ops = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            args = e.get("args", {})
            shapes = args.get("Input Dims")
            name = e["name"] + (f"{shapes}".replace(" ", "") if shapes else "")
            if args.get("Input type"):
                name += f"{args['Input type']}".replace(" ", "")
            ops[e.get("tid")].append((e["ts"], e["ts"] + e["dur"], name))
    import bisect

    starts = {}
    for tid, v in ops.items():
        v.sort()
        starts[tid] = [o[0] for o in v]
    count, total = collections.Counter(), collections.Counter()
    for c in calls:
        v = ops.get(c.get("tid"), [])
        i = bisect.bisect_right(starts.get(c.get("tid"), []), c["ts"])
        # ops enclosing the call started before it; a step's ops number a few thousand
        stack = [name for s0, e0, name in v[max(0, i - 20000):i] if c["ts"] < e0]
        key = " > ".join(n[:90] for n in stack[-4:]) + " > " + c["name"]
        count[key] += 1
        total[key] += c["dur"]
    return [{"stack": k, "count": count[k], "us": round(v, 1)} for k, v in total.most_common(top)]


def write_timeline(events, path, min_us=2.0):
    """Small enough to bring back from the GPU machine where the trace is not: the user scopes
    (qlora::*) and every GPU idle gap of at least min_us, times in us from the first scope, each
    gap with the innermost CPU op and the runtime call in flight when it began."""
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    scopes = sorted((e["ts"], e["dur"], e["name"]) for e in events if e.get("cat") == "user_annotation")
    t0 = scopes[0][0] if scopes else (gpu[0][0] if gpu else 0)
    ops = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "cpu_op")
    rts = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                 if e.get("cat") in ("cuda_runtime", "cuda_driver"))
    import bisect

    def innermost(items, starts, t):
        best = None
        i = bisect.bisect_right(starts, t)
        for k in range(i - 1, max(-1, i - 400), -1):
            s0, e0, name = items[k]
            if s0 <= t < e0 and (best is None or s0 > best[0]):
                best = (s0, name)
        return best[1][:50] if best else "-"

    op_starts = [o[0] for o in ops]
    rt_starts = [r[0] for r in rts]
    gaps = []
    if gpu:
        busy_end = gpu[0][1]
        for start, end in gpu[1:]:
            if start - busy_end >= min_us:
                gaps.append([round(busy_end - t0, 1), round(start - busy_end, 1),
                             innermost(ops, op_starts, busy_end), innermost(rts, rt_starts, busy_end)])
            busy_end = max(busy_end, end)
    with open(path, "w") as f:
        json.dump({"scopes": [[round(s - t0, 1), round(d, 1), n] for s, d, n in scopes],
                   "gaps": gaps}, f)


def idle_by_phase(events, bins=(2.0, 5.0, 20.0, 100.0, 1000.0)):
    """The GPU's idle time in gaps of every size from bins[0] up, by the size of the gap and by
    the trainer's phase (the innermost user scope the host was in when the gap began:
    qlora::forward, qlora::backward, qlora::loss_read, qlora::apply_gradients,
    qlora::next_window, qlora::on_step; "-" outside them). Small gaps many times over are the
    host launching kernels slower than the GPU runs them; one large gap a step is the step's
    boundary."""
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not gpu:
        return {}
    scopes = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "user_annotation")
    import bisect

    starts = [s[0] for s in scopes]
    by_size = collections.Counter()
    count_by_size = collections.Counter()
    by_phase = collections.Counter()
    busy_end = gpu[0][1]
    for start, end in gpu[1:]:
        d = start - busy_end
        if d >= bins[0]:
            label = next((f"<{hi:g}us" for hi in bins[1:] if d < hi), f">={bins[-1]:g}us")
            by_size[label] += d
            count_by_size[label] += 1
            phase = "-"
            i = bisect.bisect_right(starts, busy_end)
            best = None
            for k in range(i - 1, max(-1, i - 200), -1):
                s0, e0, name = scopes[k]
                if s0 <= busy_end < e0 and (best is None or s0 > best[0]):
                    best = (s0, name)
            if best:
                phase = best[1]
            by_phase[phase[:60]] += d
        busy_end = max(busy_end, end)
    return {"min_gap_us": bins[0],
            "by_gap_size": [{"gap": k, "count": count_by_size[k], "us": round(v, 1)} for k, v in by_size.most_common()],
            "by_phase": [{"phase": k, "us": round(v, 1)} for k, v in by_phase.most_common()]}


if __name__ == "__main__":
    main()
