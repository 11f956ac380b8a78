#!/usr/bin/env bash
# The GPU machine's one command: configure and build against the torch that is installed there
# (CUDA build of LibTorch 2.11), run the `cuda`-labelled tests, the benchmarks (qlora and, with
# --peer, transformers + PEFT + bitsandbytes side by side), and print JSON and tables.
#
#   bash scripts/gpu.sh                    # build, cuda tests, bench_nf4, bench_train (2x512,4x1024,8x2048)
#   bash scripts/gpu.sh --suite shapes     # the comparison with the peer, first half (below)
#   bash scripts/gpu.sh --suite variants   # the comparison with the peer, second half
#   bash scripts/gpu.sh --suite families   # Qwen3-8B and Qwen2.5-1.5B beside the peer, a plan per family
#   bash scripts/gpu.sh --suite families2  # Phi-4-mini and Gemma-3-4B beside the peer, a plan per family
#   bash scripts/gpu.sh --suite lengths    # full rows beside alpaca-like lengths, padded and packed (1B, 8B)
#   bash scripts/gpu.sh --suite generate   # the cuda tests, decoding speed of qlora and the peer (8B, batch 1 and 8)
#   bash scripts/gpu.sh --suite long       # the 8B at 2 × 2048, 16k and 32k tokens, checkpoints on the GPU and offloaded
#   bash scripts/gpu.sh --suite maxseq     # the cuda tests, then the 8B's longest sequence under a 22 GiB cap
#   options (after --suite they change the preset):
#   --all                the whole CPU suite too (builds every test)
#   --no-tests           no ctest
#   --no-bench           no benchmarks at all
#   --train NAMES        bench_train --configs NAMES ("" for none)
#   --peer NAMES         scripts/bench_peer.py --configs NAMES, then scripts/bench_compare.py
#   --peer-modes MODES   eager,compile (default)
#   --profile NAMES      bench_train --profile for these: scripts/profile_summary.py of each
#   --demo               `qlora demo` on the GPU and on the CPU, held-out numbers side by side
#   --demo-cpu FILE      the CPU run's metrics.jsonl, made on another machine (bench/results/...):
#                        only the GPU demo runs here
#   --steps N            bench_train's optimizer steps a configuration (default 22: 2 warm-up)
#   --jobs N             the peer's warm-ups side by side (scripts/bench_peer.py --jobs; default 8)
#   --measure            `qlora plan --measure` on the seven comparison configurations, and the finder
#   --finder             only the 8B finder under a 15 GiB cap
#   --measure-families   `qlora plan --measure` on one preset of each family (qwen2.5-0.5b, qwen3-0.6b,
#                        smollm2-360m, mistral-7b-v0.3), the plan's bytes beside the measured peaks
#   --no-nf4             no bench_nf4
#   --no-plans           none of --measure, --finder, --measure-families (the peer gets their time)
#   --generate           bench_generate and scripts/bench_peer_generate.py: decoding tokens/s of
#                        Llama-3.1-8B NF4 + LoRA, batch 1 and 8, against the copy-bandwidth bound
#
# The comparison with transformers + PEFT + bitsandbytes in three runs, each under the machine's
# 10-minute limit (every phase has its own time limit, so a run always returns what finished;
# what did not run reads "not run" in the comparison, never "met"):
#   shapes:   the cuda tests, bench_nf4, bench_train on 2x512, 4x1024, 8x2048 and their
#             selective / auto recompute rows, the peer (eager, compiled) on 2x512, 4x1024,
#             8x2048; then `qlora demo` on the GPU against the CPU run committed under
#             bench/results (the GPU run must reach the CPU run's held-out exact match).
#   variants: bench_train and the peer on 8b-2x2048 (and its selective and auto-under-a-cap
#             rows), all-linear-4x1024, no-ckpt-2x512, fp16-4x1024.
#   families2: as families, on phi-4-mini-4x1024 (LoRA on qkv_proj, o_proj) and gemma-3-4b-4x1024,
#             the plans on gemma-2-2b, gemma-3-1b and phi-3.5-mini.
#   families: the cuda tests, bench_train and the peer (eager, compiled) on qwen3-8b-2x2048 and
#             qwen2.5-1.5b-4x1024 (r 16 on q,k,v,o, checkpointing, bf16: the other families at
#             the default settings; no bench_nf4), then --measure-families. Expected (from the
#             suites above on an H100): build ~110 s on a fresh machine (0 warm), tests ~20 s,
#             bench_train ~60-90 s, the peer ~250-280 s (writing the random 8B, 16 GB, and the
#             1.5B; four warm-ups side by side, the compiled 8B's the longest: 165 s for
#             Llama-3.1-8B), the four plans ~40 s (the peer's limit leaves them 50 s): about
#             520 s fresh, 410 s warm. On a fresh machine the compiled Qwen3-8B warm-up is the
#             run nearest its limit; if it reads "not timed", run the suite again while warm.
#   The peer's torch.compile warm-ups (90-220 s a configuration on an H200) run side by side
#   (--jobs), its timed steps one at a time; what does not fit reads "not run".
#   Phases run in this order: build, tests, bench_nf4, bench_train, peer, demo, profiles,
#   --measure, --measure-families, and none runs past QLORA_GPU_DEADLINE (560 s), so the results
#   always come back.
#   A machine still warm from the first run keeps build-gpu/, so the second rebuilds nothing.
#
# The same CMakeLists.txt as everywhere; only -DQLORA_CUDA=ON and the Python whose torch to link
# differ. Every log and JSON goes to $build/out; with $OUT set (the folder the GPU machine hands
# back, at most 8 files) it also writes $OUT/summary.txt (the tables) and $OUT/results.tar.gz
# (everything).
# bitsandbytes for the peer: a wheel in .whl/ (carried; the GPU machine reaches no registry) is
# installed into /tmp/site when `import bitsandbytes` fails.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build=${QLORA_GPU_BUILD:-build-gpu}
python=${QLORA_PYTHON:-$(command -v python3)}
archs=${QLORA_CUDA_ARCHS:-90}
out="$root/$build/out"

all=0 tests=1 bench=1 nf4=1 demo=0 generate=0 measure=0 measure_families=0 finder=0 max_seq=0 suite="" demo_cpu="" steps=22 jobs=8
train_configs="2x512,4x1024,8x2048" peer_configs="" peer_modes="eager,compile" profile_configs=""
preset() {
  case "$1" in
    shapes) demo=1; demo_cpu=$(ls -d "$root"/bench/results/*/demo-cpu-metrics.jsonl 2>/dev/null | sort | tail -1)
       train_configs="2x512,4x1024,8x2048,selective-4x1024,selective-8x2048,auto-8x2048"
       peer_configs="2x512,4x1024,8x2048" ;;
    variants) tests=0; train_configs="8b-2x2048,selective-8b-2x2048,auto-8b-2x2048-cap,all-linear-4x1024,no-ckpt-2x512,fp16-4x1024"
       peer_configs="8b-2x2048,all-linear-4x1024,no-ckpt-2x512,fp16-4x1024" ;;
    families) nf4=0; measure_families=1; train_configs="qwen3-8b-2x2048,qwen2.5-1.5b-4x1024"
       peer_configs="qwen3-8b-2x2048,qwen2.5-1.5b-4x1024" ;;
    families2) nf4=0; measure_families=2; train_configs="phi-4-mini-4x1024,gemma-3-4b-4x1024"
       peer_configs="phi-4-mini-4x1024,gemma-3-4b-4x1024" ;;
    generate) nf4=0; generate=1; train_configs="" ;;
    lengths) tests=0; nf4=0
       train_configs="4x1024,real-padded-4x1024,real-packed-4x1024,8b-2x2048,real-padded-8b-2x2048,real-packed-8b-2x2048" ;;
    long) tests=0; nf4=0; steps=6
       train_configs="8b-2x2048,offload-8b-2x2048,8b-1x16384,offload-8b-1x16384,8b-1x32768,offload-8b-1x32768" ;;
    maxseq) nf4=0; max_seq=1; train_configs="" ;;
    *) echo "scripts/gpu.sh: --suite expects shapes, variants, families, families2, lengths, generate, long or maxseq, got '$1'" >&2
       exit 2 ;;
  esac
}
need() { [[ $# -ge 2 ]] || { echo "scripts/gpu.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --suite) need "$@"; suite=$2; preset "$2"; shift ;;
    --all) all=1 ;;
    --no-tests) tests=0 ;;
    --no-bench) bench=0 ;;
    --train) need "$@"; train_configs=$2; shift ;;
    --peer) need "$@"; peer_configs=$2; shift ;;
    --peer-modes) need "$@"; peer_modes=$2; shift ;;
    --profile) need "$@"; profile_configs=$2; shift ;;
    --demo) demo=1 ;;
    --demo-cpu) need "$@"; demo_cpu=$2; shift ;;
    --steps) need "$@"; steps=$2; shift ;;
    --jobs) need "$@"; jobs=$2; shift ;;
    --measure) measure=1; finder=1 ;;
    --finder) finder=1 ;;
    --measure-families) measure_families=1 ;;
    --no-nf4) nf4=0 ;;
    --no-plans) measure=0; finder=0; measure_families=0; max_seq=0 ;;
    --generate) generate=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "scripts/gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

start=$(date +%s)
# The GPU machine stops a command at 600 s and then returns only what is already in $OUT, so
# every phase ends by this deadline and the packing after it always runs.
deadline=${QLORA_GPU_DEADLINE:-560}
elapsed() { echo $(( $(date +%s) - start )); }
phase() { echo "== [$(elapsed) s] $*"; }
failures=()
failed() { failures+=("$1"); echo "== $1 FAILED"; }
# Runs "$@" for at most $1 seconds and never past the deadline; a phase stopped at its limit,
# or skipped because too little time is left, is reported, not fatal.
limited() {
  local limit=$1; shift
  local left=$(( deadline - $(elapsed) ))
  (( left < limit )) && limit=$left
  if (( left < 20 )); then
    echo "== skipped, ${left} s left before the ${deadline} s deadline: $*"
    return 124
  fi
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  [[ $rc == 124 || $rc == 137 ]] && echo "== stopped at its ${limit} s limit: $*"
  return $rc
}
rm -rf "$out"; mkdir -p "$out"
# bitsandbytes for the peer: the carried wheel, when the machine's Python has none.
ensure_bitsandbytes() {
  "$python" -c "import bitsandbytes" 2>/dev/null && return 0
  shopt -s nullglob
  local wheels=("$root"/.whl/*.whl)
  shopt -u nullglob
  if [[ ${#wheels[@]} -gt 0 ]]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "${wheels[@]}" && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

# ---------------------------------------------------------------- build
# The GPU machine has no Debian gloo package and no network: Gloo's headers travel in
# .whl/gloo (dpkg -x of libgloo-dev, made on the developer machine).
gloo_args=()
[[ -d "$root/.whl/gloo/usr/include/gloo" ]] && gloo_args=(-DQLORA_GLOO_ROOT="$root/.whl/gloo/usr")
# utf8proc likewise: .whl/textlibs is dpkg -x of libutf8proc-dev and libutf8proc2, used when
# the machine has no utf8proc.h of its own (Oniguruma is vendored in third_party/).
[[ -f /usr/include/utf8proc.h || ! -d "$root/.whl/textlibs/usr" ]] || gloo_args+=(-DQLORA_DEPS_ROOT="$root/.whl/textlibs/usr")
phase "configure and build ($build)"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQLORA_CUDA=ON \
  -DQLORA_PYTHON="$python" -DQLORA_CUDA_ARCHS="$archs" "${gloo_args[@]}" >"$out/configure.log" 2>&1 \
  || { tail -30 "$out/configure.log"; exit 1; }
grep "qlora:" "$out/configure.log" || true
targets=()
if [[ $all == 0 ]]; then
  # Only what this run uses: the binary, the benchmarks and the cuda test program
  # (qlora_cuda_tests; test_cuda_* where each test file is a program of its own). A test
  # program not built leaves "NOT_BUILT" entries without the cuda label, which -L cuda skips.
  mapfile -t targets < <(ninja -C "$build" -t targets all | sed -n 's/^\(test_cuda_[a-z0-9_]*\|qlora_cuda_tests\|bench_[a-z0-9_]*\|qlora\): .*/\1/p' | sort -u)
fi
ninja -C "$build" -j"$(nproc)" "${targets[@]}" >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
phase "built"
"$build/qlora" env --json >"$out/env.json" 2>&1 || failed "qlora env"

# ---------------------------------------------------------------- tests
if [[ $tests == 1 ]]; then
  labels=(-L cuda)
  [[ $all == 1 ]] && labels=()
  phase "ctest ${labels[*]}"
  limited 420 ctest --test-dir "$build" "${labels[@]}" --output-on-failure -j 8 --timeout 300 --test-output-size-passed 65536 \
    --output-junit "$out/ctest.xml" >"$out/ctest.log" 2>&1 || failed "ctest"
  grep -E "tests passed|tests failed|\(Failed\)|\(SEGFAULT\)|Not Run|Timeout" "$out/ctest.log" | head -20
fi

# ---------------------------------------------------------------- benchmarks
if [[ $bench == 1 ]]; then
  if [[ $nf4 == 1 ]]; then
    phase "bench_nf4"
    limited 120 "$build/bench/bench_nf4" >"$out/bench_nf4.json" 2>"$out/bench_nf4.log" || failed "bench_nf4"
  fi
  if [[ -n $train_configs ]]; then
    phase "bench_train --configs $train_configs"
    limited 300 "$build/bench/bench_train" --configs "$train_configs" --steps "$steps" >"$out/bench_train.json" 2>"$out/bench_train.log" \
      || failed "bench_train"
    cut -c1-240 "$out/bench_train.json"
  fi
  if [[ -n $peer_configs ]]; then
    ensure_bitsandbytes
    # What follows the peer keeps its share of the run: the demo (two runs), the profiles and the
    # four family plans (5-15 s each; what the peer leaves unused comes on top).
    reserve=0
    [[ $demo == 1 ]] && reserve=$(( reserve + (${#demo_cpu} > 0 ? 60 : 150) ))
    [[ -n $profile_configs ]] && reserve=$(( reserve + 60 * $(tr ',' '\n' <<<"$profile_configs" | grep -c .) ))
    [[ $measure_families != 0 ]] && reserve=$(( reserve + 50 ))
    peer_limit=$(( deadline - $(elapsed) - reserve ))
    phase "bench_peer --configs $peer_configs --modes $peer_modes"
    # Its warm-ups stop being waited for 60 s before its limit, so what is ready still gets timed.
    PYTHONUNBUFFERED=1 limited "$peer_limit" "$python" scripts/bench_peer.py --configs "$peer_configs" --modes "$peer_modes" \
      --jobs "$jobs" --deadline $(( peer_limit > 120 ? peer_limit - 60 : peer_limit / 2 )) \
      >"$out/bench_peer.json" 2>"$out/bench_peer.log" || failed "bench_peer"
    if [[ -s "$out/bench_train.json" ]]; then
      "$python" scripts/bench_compare.py "$out/bench_train.json" "$out/bench_peer.json" --json "$out/compare.json" \
        >"$out/compare.txt" 2>&1 || failed "bench_compare"
      cat "$out/compare.txt"
    fi
  fi
fi

# ---------------------------------------------------------------- decoding speed
if [[ $bench == 1 && $generate == 1 ]]; then
  phase "bench_generate"
  # QLORA_BENCH_GENERATE_ARGS: more bench_generate options (e.g. --modes graph,eager).
  # shellcheck disable=SC2086
  limited 200 "$build/bench/bench_generate" ${QLORA_BENCH_GENERATE_ARGS:-} >"$out/bench_generate.json" \
    2>"$out/bench_generate.log" || failed "bench_generate"
  cut -c1-400 "$out/bench_generate.json"
  ensure_bitsandbytes
  phase "bench_peer_generate"
  PYTHONUNBUFFERED=1 limited 330 "$python" scripts/bench_peer_generate.py >"$out/bench_peer_generate.json" \
    2>"$out/bench_peer_generate.log" || failed "bench_peer_generate"
  "$python" - "$out" <<'PYEOF' | tee "$out/generate-compare.txt"
import json, os, sys
out = sys.argv[1]
def rows(name):
    path = os.path.join(out, name)
    return [json.loads(l) for l in open(path) if l.startswith("{")] if os.path.exists(path) else []
ours = [r for r in rows("bench_generate.json") if r.get("bench") == "generate"]
peer = {r["batch"]: r for r in rows("bench_peer_generate.json") if r.get("bench") == "generate"}
print("| batch | qlora mode | qlora decode tok/s | of the bandwidth bound | peer decode tok/s | x peer | qlora peak GB | peer peak GB |")
print("|---|---|---|---|---|---|---|---|")
for r in ours:
    p = peer.get(r["batch"], {})
    if "error" in r or "decode_tokens_per_second" not in r:
        print(f"| {r.get('batch')} | {r.get('mode')} | error: {r.get('error', '?')[:120]} | | | | | |")
        continue
    ptps = p.get("decode_tokens_per_second")
    ratio = f"{r['decode_tokens_per_second'] / ptps:.2f}" if ptps else "peer not run"
    gb = lambda b: f"{b / 1e9:.2f}" if b else "-"
    print(f"| {r['batch']} | {r['mode']} | {r['decode_tokens_per_second']:,.1f} | {100 * r['fraction_of_bound']:.0f}% "
          f"of {r['bound_tokens_per_second']:,.0f} | {ptps and f'{ptps:,.1f}' or p.get('error', 'not run')[:80]} | {ratio} "
          f"| {gb(r.get('peak_allocated_bytes'))} | {gb(p.get('peak_allocated_bytes'))} |")
PYEOF
fi

# ---------------------------------------------------------------- the demo on GPU and CPU
if [[ $demo == 1 ]]; then
  demo_devices=(cuda cpu)
  if [[ -n $demo_cpu ]]; then
    # The CPU run was made elsewhere (its metrics committed): only the GPU runs here.
    demo_devices=(cuda)
    mkdir -p "$out/demo-cpu/out" && cp "$demo_cpu" "$out/demo-cpu/out/metrics.jsonl"
    echo "demo cpu: from $demo_cpu"
  fi
  for device in "${demo_devices[@]}"; do
    phase "qlora demo --device $device"
    limited 200 "$build/qlora" demo --device "$device" --dir "$out/demo-$device" >"$out/demo-$device.log" 2>&1 \
      || failed "demo on $device"
    rm -rf "$out/demo-$device/model" "$out/demo-$device/out"/checkpoint-*  # keep the returned files small
  done
  "$python" - "$out" <<'PYEOF' | tee "$out/demo-compare.txt"
import json, os, sys
out = sys.argv[1]
def rows(device):
    path = os.path.join(out, f"demo-{device}", "out", "metrics.jsonl")
    if not os.path.exists(path):
        return None
    return [json.loads(l) for l in open(path) if l.strip()]
got = {d: rows(d) for d in ("cuda", "cpu")}
final = {}
for d, r in got.items():
    evals = [x for x in r or [] if x.get("type") == "eval"]
    train = [x for x in r or [] if x.get("type") == "train"]
    if not evals or not train:
        print(f"demo {d}: no metrics (see demo-{d}.log)")
        continue
    first, last = evals[0], evals[-1]
    final[d] = last
    print(f"demo {d}: step 1 loss {train[0]['loss']:.4f}; held-out loss {first['loss']:.3f} -> {last['loss']:.3f}, "
          f"exact match {first['exact_match']}/{first['generated']} -> {last['exact_match']}/{last['generated']}")
if len(final) == 2:
    g, c = final["cuda"]["exact_match"], final["cpu"]["exact_match"]
    print(f"demo gpu vs cpu: the GPU run's final exact match {g} {'reaches' if g >= c else 'is below'} the CPU run's {c}")
PYEOF
fi

if [[ $bench == 1 ]]; then
  if [[ -n $profile_configs ]]; then
    IFS=, read -ra names <<<"$profile_configs"
    for name in "${names[@]}"; do
      phase "bench_train --profile ($name)"
      limited 120 "$build/bench/bench_train" --configs "$name" --steps 5 --profile "$out/trace" \
        >"$out/profile-$name.json" 2>"$out/profile-$name.log" || failed "profile $name"
      if [[ -f "$out/trace_$name.json" ]]; then
        "$python" scripts/profile_summary.py "$out/trace_$name.json" --top 25 \
          --timeline "$out/profile-timeline-$name.json" >"$out/profile-summary-$name.json"
        rm -f "$out/trace_$name.json"  # hundreds of MB; the summary is what comes back
        "$python" -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: v for k, v in d.items() if not isinstance(v, (list, dict))})" \
          "$out/profile-summary-$name.json"
      fi
    done
  fi
fi

# ---------------------------------------------------------------- plan --measure
if [[ $measure == 1 ]]; then
  phase "qlora plan --measure"
  one_b=(--config configs/llama-3.2-1b-t4.yaml --set train.precision=bf16)
  eight_b=(--config configs/llama-3.1-8b-t4.yaml --set train.precision=bf16)
  measure_one() {
    local name=$1; shift
    echo "-- $name"
    limited 120 "$build/qlora" plan "$@" --measure --json 2>"$out/measure-$name.log" >"$out/measure-$name.json" \
      || failed "measure $name"
    grep -v "^\[" "$out/measure-$name.log" | tail -9
  }
  measure_one 1b-2x512 "${one_b[@]}" --set train.micro_batch_size=2 --seq 512
  measure_one 1b-4x1024 "${one_b[@]}" --set train.micro_batch_size=4 --seq 1024
  measure_one 1b-8x2048 "${one_b[@]}" --set train.micro_batch_size=8 --seq 2048
  measure_one 1b-all-linear-4x1024 "${one_b[@]}" --set train.micro_batch_size=4 --seq 1024 --set lora.target_modules=all-linear
  measure_one 1b-no-ckpt-2x512 "${one_b[@]}" --set train.micro_batch_size=2 --seq 512 --set train.gradient_checkpointing=false
  measure_one 1b-fp16-4x1024 --config configs/llama-3.2-1b-t4.yaml --set train.micro_batch_size=4 --seq 1024
  measure_one 8b-2x2048 "${eight_b[@]}" --set train.micro_batch_size=2 --seq 2048
fi
# ---------------------------------------------------------------- plan --measure, a model a family
if [[ $measure_families != 0 ]]; then
  phase "qlora plan --measure: one model of each family"
  # The 1B T4 config's settings (r 16 on q,k,v,o, checkpointing, paged 8-bit AdamW) in bf16, on
  # the family's preset: random weights drawn on the GPU, nothing to download. Small presets (and
  # the 7B at 2 x 1024) so that the four fit in what the peer leaves. family:preset:micro:seq
  family_runs=(qwen2:qwen2.5-0.5b:4:1024 qwen3:qwen3-0.6b:4:1024 llama:smollm2-360m:4:1024
               mistral:mistral-7b-v0.3:2:1024)
  [[ $measure_families == 2 ]] && family_runs=(gemma2:gemma-2-2b:2:1024 gemma3_text:gemma-3-1b:4:1024
                                              phi3:phi-3.5-mini:2:1024)
  for run in "${family_runs[@]}"; do
    IFS=: read -r family preset micro seq <<<"$run"
    name="$preset-${micro}x$seq"
    echo "-- $family: $name"
    limited 90 "$build/qlora" plan --config configs/llama-3.2-1b-t4.yaml --set model.preset="$preset" \
      --set train.precision=bf16 --set train.micro_batch_size="$micro" --seq "$seq" --measure --json \
      2>"$out/measure-$name.log" >"$out/measure-$name.json" || failed "measure $name"
  done
  # The plan's estimate and the measured peak side by side (the tables are in measure-*.log).
  "$python" - "$out" "${family_runs[@]}" <<'PYEOF' | tee "$out/measure-families.txt"
import json, os, sys
out, runs = sys.argv[1], sys.argv[2:]
gib = lambda b: f"{b / 2**30:.2f}"
head = ["family", "preset", "micro x seq", "plan allocated GiB", "measured peak GiB", "error",
        "plan reserved GiB", "measured reserved GiB", "error", "plan total GiB", "s/step"]
lines = [head]
for run in runs:
    family, preset, micro, seq = run.split(":")
    path = os.path.join(out, f"measure-{preset}-{micro}x{seq}.json")
    rows = [json.loads(l) for l in open(path) if l.startswith("{")] if os.path.exists(path) else []
    m = rows[-1] if rows else None
    if m is None:
        lines.append([family, preset, f"{micro} x {seq}", "not run (see the log)"] + [""] * (len(head) - 4))
        continue
    pct = lambda p, q: f"{100 * (p - q) / q:+.1f}%" if q else "-"
    oom = " (out of memory)" if m.get("out_of_memory") else ""
    lines.append([family, preset, f"{m['micro']} x {m['seq']}{oom}", gib(m["predicted_allocated_bytes"]),
                  gib(m["peak_allocated_bytes"]), pct(m["predicted_allocated_bytes"], m["peak_allocated_bytes"]),
                  gib(m["predicted_reserved_bytes"]), gib(m["peak_reserved_bytes"]),
                  pct(m["predicted_reserved_bytes"], m["peak_reserved_bytes"]), gib(m["predicted_total_bytes"]),
                  f"{m['seconds_per_step']:.3f}"])
widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
for k, l in enumerate(lines):
    print("| " + " | ".join(c.ljust(w) for c, w in zip(l, widths)) + " |")
    if k == 0:
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
PYEOF
fi
if [[ $finder == 1 ]]; then
  phase "qlora plan --find-micro-batch: 8B, fp16 as on a T4, under a 15 GiB cap at seq 2048"
  limited 200 "$build/qlora" plan --config configs/llama-3.1-8b-t4.yaml --find-micro-batch --memory-cap 15GiB --seq 2048 \
    >"$out/finder-8b-15gib.txt" 2>&1 || failed "finder"
  tail -3 "$out/finder-8b-15gib.txt"
fi
if [[ $max_seq == 1 ]]; then
  # LoRA dropout 0, as Unsloth's fast path trains (the comparison the long-context targets are from).
  phase "qlora plan --find-max-seq: 8B, batch 1, r 16 on q,k,v,o, dropout 0, bf16, under a 22 GiB cap"
  limited 300 "$build/qlora" plan --set model.preset=llama-3.1-8b --set train.micro_batch_size=1 \
    --set train.gradient_accumulation_steps=1 --set train.precision=bf16 --set lora.dropout=0 --find-max-seq \
    --memory-cap 22GiB --seq 131072 >"$out/max-seq-8b-22gib.txt" 2>&1 || failed "find-max-seq"
  tail -12 "$out/max-seq-8b-22gib.txt"
fi

# ---------------------------------------------------------------- what comes back
phase "done${suite:+ (suite $suite)}; failures: ${failures[*]:-none}"
{
  echo "scripts/gpu.sh ${suite:+--suite $suite} on $(date -u +%F), $(elapsed) s; failures: ${failures[*]:-none}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  grep -E "tests passed|tests failed|\(Failed\)" "$out/ctest.log" 2>/dev/null
  cat "$out/demo-compare.txt" "$out/compare.txt" "$out/generate-compare.txt" "$out/measure-families.txt" 2>/dev/null
  for f in "$out"/profile-summary-*.json; do
    [[ -f $f ]] && "$python" -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].rsplit('/',1)[-1], {k: v for k, v in d.items() if not isinstance(v, (list, dict))})" "$f"
  done
} >"$out/summary.txt" 2>&1
if [[ -n ${OUT:-} ]]; then
  cp "$out/summary.txt" "$OUT/summary.txt"
  tar -C "$build" -czf "$OUT/results.tar.gz" out
fi
[[ ${#failures[@]} == 0 ]]
