#include "qlora/train/threads.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>

namespace qlora::train {
namespace {

// LibTorch's OpenMP runtime (the GNU libgomp its wheel ships) is loaded with
// libtorch_cpu, but we compile without -fopenmp and link no OpenMP ourselves:
// its two entry points are looked up in the process. A LibTorch built without
// OpenMP has neither, and then nothing adjusts a thread count on its own.
using SetDynamicFn = void(int);
using GetDynamicFn = int();

SetDynamicFn* omp_set_dynamic_fn() {
  static auto* fn = reinterpret_cast<SetDynamicFn*>(dlsym(RTLD_DEFAULT, "omp_set_dynamic"));
  return fn;
}

GetDynamicFn* omp_get_dynamic_fn() {
  static auto* fn = reinterpret_cast<GetDynamicFn*>(dlsym(RTLD_DEFAULT, "omp_get_dynamic"));
  return fn;
}

}  // namespace

int pin_cpu_threads(int threads) {
  set_openmp_dynamic_threads(false);
  const int n = threads > 0 ? threads : at::get_num_threads();
  // at::set_num_threads sets OpenMP's count and oneMKL's, and turns oneMKL's
  // dynamic adjustment off (mkl_set_dynamic(0)); until it is called oneMKL
  // keeps MKL_DYNAMIC's default, on.
  at::set_num_threads(n);
  return at::get_num_threads();
}

bool openmp_dynamic_threads() {
  GetDynamicFn* get = omp_get_dynamic_fn();
  return get != nullptr && get() != 0;
}

void set_openmp_dynamic_threads(bool on) {
  if (SetDynamicFn* set = omp_set_dynamic_fn()) set(on ? 1 : 0);
}

}  // namespace qlora::train
