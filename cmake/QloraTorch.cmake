# LibTorch, as shipped inside the PyPI `torch` wheel (pinned in scripts/setup.sh).
#
# We do not call find_package(Torch): the wheel's TorchConfig.cmake insists on the
# whole CUDA stack (cuDNN, NCCL, cuSPARSELt, NVSHMEM, ...) even for a CPU-only
# program. Instead an imported target `qlora::torch` names the headers and the
# libraries we link: libtorch_cpu + libc10 always, libtorch_cuda + libc10_cuda
# with QLORA_CUDA=ON (the GPU machine, where all of torch's CUDA wheels exist).
# libtorch_cpu finds its libcudart/libcupti through its own RPATH
# ($ORIGIN/../../nvidia/cu13/lib), which setup.sh fills from PyPI.

if(NOT QLORA_PYTHON)
  find_program(QLORA_PYTHON_FOUND NAMES python3 python)
  if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/.venv/bin/python)
    set(QLORA_PYTHON ${CMAKE_CURRENT_SOURCE_DIR}/.venv/bin/python)
  else()
    set(QLORA_PYTHON ${QLORA_PYTHON_FOUND})
  endif()
endif()

# find_spec locates the package without importing it (an import would need all
# of torch's CUDA wheels, which the build does not).
execute_process(
  COMMAND ${QLORA_PYTHON} -c
    "import importlib.util, importlib.metadata as m, os; s = importlib.util.find_spec('torch'); print(os.path.dirname(s.origin) + ';' + m.version('torch'))"
  OUTPUT_VARIABLE _qlora_torch_out OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _qlora_torch_rc ERROR_QUIET)
if(NOT _qlora_torch_rc EQUAL 0 OR NOT _qlora_torch_out)
  message(FATAL_ERROR
    "qlora: no torch package found for ${QLORA_PYTHON}.\n"
    "Run `bash scripts/setup.sh` (it installs the pinned torch wheel into .venv), "
    "or pass -DQLORA_PYTHON=/path/to/python whose environment has torch.")
endif()
list(GET _qlora_torch_out 0 QLORA_TORCH_DIR)
list(GET _qlora_torch_out 1 QLORA_TORCH_VERSION)
message(STATUS "qlora: LibTorch ${QLORA_TORCH_VERSION} from ${QLORA_TORCH_DIR}")

set(_lib ${QLORA_TORCH_DIR}/lib)
set(_libs ${_lib}/libtorch_cpu.so ${_lib}/libc10.so)
if(QLORA_CUDA)
  list(APPEND _libs ${_lib}/libtorch_cuda.so ${_lib}/libc10_cuda.so)
endif()
foreach(_f ${_libs})
  if(NOT EXISTS ${_f})
    message(FATAL_ERROR "qlora: ${_f} is missing from the torch package in ${QLORA_TORCH_DIR}")
  endif()
endforeach()

add_library(qlora_torch INTERFACE)
add_library(qlora::torch ALIAS qlora_torch)
target_include_directories(qlora_torch SYSTEM INTERFACE
  ${QLORA_TORCH_DIR}/include
  ${QLORA_TORCH_DIR}/include/torch/csrc/api/include)
# --no-as-needed: libtorch_cuda registers its CUDA hooks from static
# initialisers; nothing references it by symbol, so a linker dropping unused
# libraries would silently leave the binary CPU-only.
target_link_libraries(qlora_torch INTERFACE "-Wl,--no-as-needed" ${_libs} "-Wl,--as-needed")
target_link_options(qlora_torch INTERFACE "-Wl,-rpath,${_lib}")
target_compile_definitions(qlora_torch INTERFACE QLORA_TORCH_VERSION="${QLORA_TORCH_VERSION}")
if(QLORA_CUDA)
  target_compile_definitions(qlora_torch INTERFACE QLORA_WITH_CUDA=1 USE_CUDA=1)
endif()
