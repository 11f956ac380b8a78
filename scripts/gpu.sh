#!/usr/bin/env bash
# The GPU machine's one command: configure and build against the torch that is
# installed there (CUDA build of LibTorch 2.11), run every `cuda`-labelled test
# (and the CPU suite with --all), run the benchmarks, and print JSON.
#
#   bash scripts/gpu.sh            # build, cuda tests, benchmarks
#   bash scripts/gpu.sh --all      # also the whole CPU suite
#   bash scripts/gpu.sh --demo     # also `qlora demo` (200 steps) on the GPU
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
for arg in "$@"; do
  case "$arg" in
    --all) all=1 ;;
    --demo) demo=1 ;;
    *) echo "scripts/gpu.sh: unknown option $arg (accepted: --all, --demo)" >&2; exit 2 ;;
  esac
done

start=$(date +%s)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQLORA_CUDA=ON \
  -DQLORA_PYTHON="$python" -DQLORA_CUDA_ARCHS="$archs" >"$out/configure.log"
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
# Benchmarks: every bench_* program prints JSON lines (QLORA_BENCH_ARGS are passed to each).
shopt -s nullglob
for bench in "$build"/bench/bench_*; do
  name=$(basename "$bench")
  echo "== $name"
  "$bench" ${QLORA_BENCH_ARGS:-} 2>"$out/$name.log" | tee "$out/$name.json" || echo "== $name failed"
done
echo "== total $(( $(date +%s) - start )) s"
