#!/usr/bin/env bash
# The GPU machine's one command: configure and build against the torch that is
# installed there (CUDA build of LibTorch 2.11), run every `cuda`-labelled test
# (and the CPU suite with --all), run the benchmarks, and print JSON.
#
#   bash scripts/gpu.sh            # build, cuda tests, benchmarks
#   bash scripts/gpu.sh --all      # also the whole CPU suite
#   bash scripts/gpu.sh --demo     # also `qlora demo` (200 steps) on the GPU
#   bash scripts/gpu.sh --measure  # also `qlora plan --measure` on the issue's configurations
#                                  # and --find-micro-batch for the 8B under a 15 GiB cap
#   bash scripts/gpu.sh --finder   # only the finder part of --measure
#   bash scripts/gpu.sh --no-bench # skip the benchmarks
#
# The same CMakeLists.txt as everywhere; only -DQLORA_CUDA=ON and the Python
# whose torch to link differ. Results also go to $OUT (the device tool's
# return folder) when it is set.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build=${QLORA_GPU_BUILD:-build-gpu}
python=${QLORA_PYTHON:-$(command -v python3)}
archs=${QLORA_CUDA_ARCHS:-90}
out=${OUT:-$build/out}
mkdir -p "$out"
all=0
demo=0
measure=0
finder=0
run_bench=1
for arg in "$@"; do
  case "$arg" in
    --all) all=1 ;;
    --demo) demo=1 ;;
    --measure) measure=1; finder=1 ;;
    --finder) finder=1 ;;
    --no-bench) run_bench=0 ;;
    *) echo "scripts/gpu.sh: unknown option $arg (accepted: --all, --demo, --measure, --finder, --no-bench)" >&2; exit 2 ;;
  esac
done
# The GPU machine has no Debian gloo package and no network: Gloo's headers
# travel in .whl/gloo (dpkg -x of libgloo-dev, made on the developer machine).
gloo_args=()
[[ -d "$root/.whl/gloo/usr/include/gloo" ]] && gloo_args=(-DQLORA_GLOO_ROOT="$root/.whl/gloo/usr")

start=$(date +%s)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQLORA_CUDA=ON \
  -DQLORA_PYTHON="$python" -DQLORA_CUDA_ARCHS="$archs" "${gloo_args[@]}" >"$out/configure.log"
grep "qlora:" "$out/configure.log" || true
ninja -C "$build" -j"$(nproc)" >"$out/build.log" || { tail -50 "$out/build.log"; exit 1; }
echo "== built in $(( $(date +%s) - start )) s"

"$build/qlora" env --json | tee "$out/env.json"

labels=(-L cuda)
[[ $all == 1 ]] && labels=()
ctest --test-dir "$build" "${labels[@]}" --output-on-failure -j 8 --timeout 600 \
  --output-junit "$root/$out/ctest.xml" 2>&1 | tee "$out/ctest.log" | tail -40 || echo "== ctest reported failures"

if [[ $demo == 1 ]]; then
  echo "== qlora demo on the GPU"
  rm -rf "$out/demo-gpu"
  "$build/qlora" demo --dir "$out/demo-gpu" 2>&1 | tee "$out/demo-gpu.log" | tail -25 || echo "== demo failed"
  rm -rf "$out/demo-gpu/model" "$out/demo-gpu/out"/checkpoint-*   # keep the returned files small
fi
if [[ $measure == 1 ]]; then
  # Issue 9: the plan against the CUDA caching allocator, random weights of the
  # preset's shape (no model files needed), one process per configuration.
  echo "== qlora plan --measure"
  one_b=(--config configs/llama-3.2-1b-t4.yaml --set train.precision=bf16)
  eight_b=(--config configs/llama-3.1-8b-t4.yaml --set train.precision=bf16)
  measure_one() {
    local name=$1; shift
    echo "-- $name"
    "$build/qlora" plan "$@" --measure --json 2>"$out/measure-$name.log" >"$out/measure-$name.json" || echo "== $name failed"
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
if [[ $finder == 1 ]]; then
  echo "== qlora plan --find-micro-batch: 8B, fp16 as on a T4, under a 15 GiB cap at seq 2048"
  "$build/qlora" plan --config configs/llama-3.1-8b-t4.yaml --find-micro-batch --memory-cap 15GiB --seq 2048 \
    2>&1 | tee "$out/finder-8b-15gib.txt" || echo "== finder failed"
fi

# Benchmarks: every bench_* program prints JSON lines (QLORA_BENCH_ARGS are passed to each).
shopt -s nullglob
[[ $run_bench == 1 ]] || echo "== benchmarks skipped (--no-bench)"
for bench in "$build"/bench/bench_*; do
  [[ $run_bench == 1 ]] || break
  name=$(basename "$bench")
  echo "== $name"
  "$bench" ${QLORA_BENCH_ARGS:-} 2>"$out/$name.log" | tee "$out/$name.json" || echo "== $name failed"
done
echo "== total $(( $(date +%s) - start )) s"
