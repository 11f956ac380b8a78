#!/usr/bin/env bash
# One-time (and idempotent) set-up of a fresh Debian 12 machine for qlora:
#   1. Debian packages: compiler tool chain and the C++ libraries qlora links.
#   2. A project-local venv (.venv) holding the pinned PyPI `torch` wheel, whose
#      bundled LibTorch (headers + shared libraries) the C++ build links against,
#      plus the two small CUDA runtime wheels LibTorch's CPU library loads.
#   3. Configure and build the `qlora` binary (build/); scripts/test.sh builds the tests.
#
#   bash scripts/setup.sh             # everything above
#   bash scripts/setup.sh --tests     # also what the oracle tests import (torch with its own
#                                     # dependencies, CPU-only use; transformers; PEFT)
#   bash scripts/setup.sh --oracles   # also the whole Python reference stack (bitsandbytes,
#                                     # tokenizers, ...) that regenerates the golden files
#                                     # under tests/data
# Re-running it only does what is missing. Nothing is installed outside the
# Debian package manager and .venv.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# Pins. TORCH_VERSION follows the PyTorch on the GPU machines (2.11.0+cu130):
# the same LibTorch version everywhere, one API surface.
TORCH_VERSION=2.11.0
CUDA_RUNTIME_VERSION=13.0.96   # libcudart.so.13, as torch 2.11's cuda-toolkit pin
CUDA_CUPTI_VERSION=13.0.85     # libcupti.so.13, likewise
TEST_PACKAGES=(transformers==5.17.0 peft==0.21.0 safetensors==0.8.0 tensorboard==2.21.0 gguf==0.19.0
               cffi==2.1.1)
# llama.cpp for tests/test_gguf_merge.cpp: the CPU build inside the llama-cpp-cffi wheel (llama.cpp
# of April 2025, built for glibc 2.34), a CFFI module of 6 MB; the rest of the 291 MB wheel (CUDA
# and Vulkan builds, a Python wrapper with its own dependencies) is not installed.
LLAMA_CPP_CFFI_VERSION=0.4.42
LLAMA_CPP_CFFI_MODULE=llama/_llama_cpp_cpu.cpython-311-x86_64-linux-gnu.so
LLAMA_CPP_CFFI_SHA256=7f003c698c3752924db24900781587ef5eeb85ad8682c41d26d8ce503a09ee91
ORACLE_PACKAGES=("${TEST_PACKAGES[@]}" bitsandbytes==0.50.2 tokenizers==0.23.3
                 sentencepiece==0.2.3 tiktoken==0.14.0 numpy)

want_tests=0
want_oracles=0
for arg in "$@"; do
  case "$arg" in
    --tests) want_tests=1 ;;
    --oracles) want_oracles=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (known: --tests, --oracles)" >&2; exit 2 ;;
  esac
done

t0=$(date +%s)
step() { printf '\n==> [%4d s] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }

# ---------------------------------------------------------------- 1. Debian packages
APT_PACKAGES=(build-essential cmake ninja-build pkg-config git python3-venv
              libcli11-dev nlohmann-json3-dev libyaml-cpp-dev libspdlog-dev libfmt-dev
              libsentencepiece-dev libutf8proc-dev libgtest-dev libgmock-dev
              libgloo-dev)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  step "Debian packages: all present"
fi

# ---------------------------------------------------------------- 2. venv + LibTorch
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  "$PY" -m venv .venv
fi
VPY="$root/.venv/bin/python"
have_torch=$("$VPY" - <<PYEOF 2>/dev/null || true
import importlib.metadata as m
try: print(m.version("torch"))
except Exception: print("")
PYEOF
)
if [ "$have_torch" != "$TORCH_VERSION" ]; then
  step "installing torch==$TORCH_VERSION into .venv (LibTorch for the C++ build)"
  # --no-deps: the C++ build needs only the LibTorch inside the wheel; its CUDA
  # dependency wheels (several GB) serve torch_cuda, which the CPU build does not link.
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps "torch==$TORCH_VERSION"
else
  step "torch $TORCH_VERSION: present"
fi
# libtorch_cpu.so itself needs libcudart.so.13 and libcupti.so.13 at load time,
# even with no GPU: take them from PyPI so the machine's CUDA toolkit is optional.
if ! "$VPY" -m pip show -q nvidia-cuda-runtime nvidia-cuda-cupti >/dev/null 2>&1; then
  step "installing CUDA runtime wheels (libcudart, libcupti)"
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps \
    "nvidia-cuda-runtime==$CUDA_RUNTIME_VERSION" "nvidia-cuda-cupti==$CUDA_CUPTI_VERSION"
fi

python_packages=()
[ $want_tests -eq 1 ] && python_packages=("${TEST_PACKAGES[@]}")
[ $want_oracles -eq 1 ] && python_packages=("${ORACLE_PACKAGES[@]}")
if [ ${#python_packages[@]} -gt 0 ]; then
  # Now torch's own dependencies too (its CUDA library wheels among them: the wheel does not
  # import without them, even on a CPU), so `import torch` works for the oracle scripts.
  # Present when every pin is installed at its version and torch imports.
  if ! "$VPY" - "${python_packages[@]}" <<'PYEOF' 2>/dev/null; then
import importlib.metadata as m, sys
for pin in sys.argv[1:]:
    name, _, version = pin.partition("==")
    if version and m.version(name) != version: sys.exit(1)
import torch, transformers, peft
PYEOF
    step "installing the Python reference packages: torch's dependencies ${python_packages[*]}"
    "$VPY" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" "${python_packages[@]}"
  else
    step "Python reference packages: all present"
  fi
  # llama.cpp: just the one module, taken out of the pinned wheel into site-packages/llama/ (a
  # namespace package: the test imports llama._llama_cpp_cpu and nothing else of the wheel).
  site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ "$(sha256sum "$site/$LLAMA_CPP_CFFI_MODULE" 2>/dev/null | cut -d' ' -f1)" != "$LLAMA_CPP_CFFI_SHA256" ]; then
    step "installing llama.cpp (CPU) from llama-cpp-cffi==$LLAMA_CPP_CFFI_VERSION"
    wheels=$(mktemp -d)
    "$VPY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$wheels" \
      "llama-cpp-cffi==$LLAMA_CPP_CFFI_VERSION"
    "$VPY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
      "$wheels"/llama_cpp_cffi-*.whl "$LLAMA_CPP_CFFI_MODULE" "$site"
    rm -rf "$wheels"
    if [ "$(sha256sum "$site/$LLAMA_CPP_CFFI_MODULE" | cut -d' ' -f1)" != "$LLAMA_CPP_CFFI_SHA256" ]; then
      echo "setup.sh: $LLAMA_CPP_CFFI_MODULE from llama-cpp-cffi==$LLAMA_CPP_CFFI_VERSION has an unexpected sha256" >&2
      exit 1
    fi
  else
    step "llama.cpp (CPU) from llama-cpp-cffi $LLAMA_CPP_CFFI_VERSION: present"
  fi
fi

# ---------------------------------------------------------------- 3. configure + build
step "configuring and building build/qlora"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-Release} \
      -DQLORA_PYTHON="$VPY" ${QLORA_CMAKE_ARGS:-} >/dev/null
cmake --build build -j "$(nproc)" --target qlora

step "done: build/qlora is ready"
