// The CUDA runtime's text for a launcher's return code (include/qlora/kernels.h).
#include <cuda_runtime.h>

#include "qlora/kernels.h"

namespace qlora::kernels {

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace qlora::kernels
