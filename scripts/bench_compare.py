#!/usr/bin/env python3
"""The side-by-side table: qlora (bench/bench_train) against transformers + PEFT +
bitsandbytes eager and under torch.compile (scripts/bench_peer.py), from the JSON lines both
print in one run of scripts/gpu.sh, with the ratios and the targets below (docs/performance.md).

    python3 scripts/bench_compare.py TRAIN.json PEER.json [--json OUT.json]

Per configuration (the names bench_train and bench_peer share, e.g. 2x512, 8b-2x2048):
  speed_vs_compiled = qlora tokens/s / compiled peer tokens/s   (target: >= 1.5 for Llama-3.2-1B,
                                                                 >= 1.2 for Llama-3.1-8B; the
                                                                 other families (Qwen, Mistral,
                                                                 SmolLM2): >= 1.25)
  speed_vs_eager    = qlora tokens/s / eager peer tokens/s
  memory_ratio      = qlora peak allocated / the smaller of the two peers' peaks (target <= 0.7)
  plan_error_pct    = bench_train's (plan allocated - measured peak) / measured peak (target +-10%)
  plan_time_pct     = bench_train's (the plan's tokens/s for this GPU - measured) / measured (no target)
A target whose inputs are missing (a peer run that failed or was not made) reads "not run",
never "met". A row of ours the peer cannot run (train.recompute: selective or auto) names the peer
run it stands beside (peer_config); its verdicts carry how it recomputed ("met (selective in 14
layers, vs the peer's 8b-2x2048)"), apart from the like-for-like row of the peer's name. Prints a table on stdout and, with --json, one object per configuration.
Only the standard library: it runs on the GPU machine and here alike.
"""
import argparse
import json
import sys

SPEED_TARGET_1B = 1.5
SPEED_TARGET_8B = 1.2
SPEED_TARGET_FAMILIES = 1.25  # Qwen, Mistral, SmolLM2 rows: at least 1.25x the compiled peer
MEMORY_TARGET = 0.7
PLAN_TOLERANCE_PCT = 10.0


def read_rows(path):
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or not line.startswith("{"):
                continue  # progress text mixed into a captured log
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"bench_compare: {path}:{number}: not JSON ({e.msg}): {line[:80]}")
    return rows


def config_name(row):
    if "config" in row:
        return row["config"]
    return f"{row.get('micro')}x{row.get('seq')}"


def speed_target(model):
    if not str(model).startswith("llama"):
        return SPEED_TARGET_FAMILIES
    return SPEED_TARGET_8B if "8b" in str(model) else SPEED_TARGET_1B


def verdict(value, target, at_least):
    if value is None:
        return "not run"
    met = value >= target if at_least else value <= target
    return "met" if met else "missed"


def compare(train_rows, peer_rows):
    ours = {config_name(r): r for r in train_rows if r.get("bench") == "train" and r.get("system") == "qlora"}
    peers = {}
    for r in peer_rows:
        if r.get("bench") == "train" and r.get("system") == "hf-peft-bnb" and "mode" in r:
            peers[(config_name(r), r["mode"])] = r
    names = list(ours)
    for name, _ in peers:
        if name not in names:
            names.append(name)
    out = []
    for name in names:
        q = ours.get(name, {})
        # A configuration of ours the peer cannot run (selective recompute) names the peer
        # run it stands beside; its ratios are information, never a verdict on the target.
        peer_name = q.get("peer_config", name)
        eager = peers.get((peer_name, "eager"), {})
        compiled = peers.get((peer_name, "compile"), {})

        def tps(r):
            return r.get("tokens_per_second") if "error" not in r else None

        def peak(r):
            return r.get("peak_allocated_bytes") if "error" not in r and r.get("peak_allocated_bytes") else None

        q_tps, e_tps, c_tps = tps(q), tps(eager), tps(compiled)
        peer_peaks = [p for p in (peak(eager), peak(compiled)) if p]
        model = q.get("model") or compiled.get("model") or eager.get("model") or ""
        row = {
            "config": name,
            "model": model,
            "qlora_tokens_per_second": q_tps,
            "eager_tokens_per_second": e_tps,
            "compiled_tokens_per_second": c_tps,
            "qlora_peak_allocated_bytes": peak(q),
            "eager_peak_allocated_bytes": peak(eager),
            "compiled_peak_allocated_bytes": peak(compiled),
            "speed_vs_eager": q_tps / e_tps if q_tps and e_tps else None,
            "speed_vs_compiled": q_tps / c_tps if q_tps and c_tps else None,
            # Both peers must have run: the target names the smaller of the two peaks.
            "memory_ratio": peak(q) / min(peer_peaks) if peak(q) and len(peer_peaks) == 2 else None,
            "plan_error_pct": q.get("plan_error_pct"),
            "plan_time_pct": q.get("plan_time_error_pct"),
            "errors": {k: r["error"] for k, r in (("qlora", q), ("eager", eager), ("compile", compiled))
                       if "error" in r},
        }
        row["peer_config"] = peer_name
        row["speed_target"] = speed_target(model)
        row["speed_verdict"] = verdict(row["speed_vs_compiled"], row["speed_target"], True)
        row["memory_verdict"] = verdict(row["memory_ratio"], MEMORY_TARGET, False)
        if peer_name != name:
            # Checkpointing as the comparison asks, but recomputing less than the peer does: the
            # verdict is given and says so (the row of the same name is the like-for-like one).
            how = q.get("recompute_as_run") or q.get("recompute") or "?"
            whole = q.get("no_recompute_layers") or 0
            kept = q.get("selective_layers") or 0
            if whole > 0:  # train.no_recompute_layers (as auto chose it): those layers keep everything
                how = f"nothing recomputed in {whole} layers"
                if kept > whole:
                    how += f", selective in {kept - whole}"
            elif how == "selective" and q.get("selective_layers") is not None:
                how += f" in {q['selective_layers']} layers"
            tag = f" ({how}, vs the peer's {peer_name})"
            row["speed_verdict"] += tag
            row["memory_verdict"] += tag
        plan = row["plan_error_pct"]
        row["plan_verdict"] = "not run" if plan is None else ("met" if abs(plan) <= PLAN_TOLERANCE_PCT else "missed")
        out.append(row)
    return out


def fmt(v, digits=0, scale=1.0, suffix=""):
    if v is None:
        return "-"
    return f"{v / scale:,.{digits}f}{suffix}"


def render(rows):
    head = ["config", "qlora tok/s", "eager tok/s", "compiled tok/s", "vs compiled", "vs eager",
            "qlora GB", "eager GB", "compiled GB", "memory ratio", "plan err", "plan time", "speed", "memory", "plan"]
    lines = [head]
    for r in rows:
        lines.append([
            r["config"], fmt(r["qlora_tokens_per_second"]), fmt(r["eager_tokens_per_second"]),
            fmt(r["compiled_tokens_per_second"]), fmt(r["speed_vs_compiled"], 2, suffix="x"),
            fmt(r["speed_vs_eager"], 2, suffix="x"), fmt(r["qlora_peak_allocated_bytes"], 2, 1e9),
            fmt(r["eager_peak_allocated_bytes"], 2, 1e9), fmt(r["compiled_peak_allocated_bytes"], 2, 1e9),
            fmt(r["memory_ratio"], 2), fmt(r["plan_error_pct"], 1, suffix="%"),
            fmt(r["plan_time_pct"], 1, suffix="%"), f"{r['speed_verdict']} (>= {r['speed_target']}x)", f"{r['memory_verdict']} (<= {MEMORY_TARGET})",
            r["plan_verdict"],
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    text = []
    for k, line in enumerate(lines):
        text.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if k == 0:
            text.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        for who, msg in r["errors"].items():
            text.append(f"{r['config']}: {who} failed: {msg[:300]}")
    return "\n".join(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("train", help="bench_train's JSON lines")
    ap.add_argument("peer", help="bench_peer.py's JSON lines")
    ap.add_argument("--json", help="also write the rows here, one JSON object a line")
    a = ap.parse_args(argv)
    rows = compare(read_rows(a.train), read_rows(a.peer))
    if not rows:
        sys.exit("bench_compare: no qlora or peer training rows in the inputs")
    print(render(rows))
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
