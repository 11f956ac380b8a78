#!/usr/bin/env bash
# Builds and runs the libFuzzer target for the safetensors reader (fuzz/safetensors_fuzz.cpp)
# under AddressSanitizer + UndefinedBehaviorSanitizer. Not part of the CMake build: it compiles
# only the torch-free reader (src/io/safetensors.cpp) with clang.
#
#   bash scripts/fuzz.sh              # 600 s, one process
#   bash scripts/fuzz.sh 60           # 60 s
#   FUZZ_ARGS="-runs=0" bash scripts/fuzz.sh   # extra libFuzzer flags
#
# Needs Debian's clang (apt-get install -y clang; its package libclang-common-<v>-dev ships
# libclang_rt.fuzzer). Seeds: the golden good files in tests/data/io and, when
# build/tests/test_io_safetensors exists, the crafted bad files of its table
# (QLORA_IO_SEED_DIR makes that test copy them out). Findings land in build-fuzz/artifacts/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seconds=${1:-600}
out=build-fuzz
mkdir -p "$out/corpus" "$out/seeds" "$out/artifacts"

CXX=${CXX_FUZZ:-clang++}
command -v "$CXX" >/dev/null || { echo "fuzz.sh: $CXX not found; apt-get install -y clang" >&2; exit 2; }

"$CXX" -std=c++17 -g -O1 -fno-omit-frame-pointer \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -Iinclude -Isrc \
  src/io/safetensors.cpp fuzz/safetensors_fuzz.cpp -o "$out/safetensors_fuzz"

cp tests/data/io/*.safetensors tests/data/io/model_sharded/*.safetensors "$out/seeds/"
if [[ -x build/tests/test_io_safetensors ]]; then
  QLORA_IO_SEED_DIR="$root/$out/seeds" build/tests/test_io_safetensors --gtest_filter='Corpus/*' >/dev/null
fi
echo "fuzz.sh: $(ls "$out/seeds" | wc -l) seed files"

# Tokens of the format, so mutations can build headers rather than only break them.
cat > "$out/safetensors.dict" <<'DICT'
"{"
"}"
"["
"]"
":"
","
"\""
"\"dtype\""
"\"shape\""
"\"data_offsets\""
"\"__metadata__\""
"\"F64\""
"\"F32\""
"\"F16\""
"\"BF16\""
"\"I64\""
"\"I32\""
"\"I16\""
"\"I8\""
"\"U8\""
"\"BOOL\""
"\"F8_E4M3\""
"\"F8_E5M2\""
"\"U16\""
"18446744073709551615"
"9223372036854775807"
"4294967296"
"-1"
"1e3"
"\\u0000"
DICT

# One process (-jobs is not used): the machine is shared.
"$out/safetensors_fuzz" "$out/corpus" "$out/seeds" \
  -dict="$out/safetensors.dict" -max_len=16384 -rss_limit_mb=2048 \
  -max_total_time="$seconds" -print_final_stats=1 \
  -artifact_prefix="$out/artifacts/" ${FUZZ_ARGS:-}
