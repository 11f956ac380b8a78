// Every assumption of the planner in one place, each with where it comes from.
// Internal to src/plan/.
#pragma once

#include <cstdint>

namespace qlora::plan {

inline constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
inline constexpr double kMiB = 1024.0 * 1024.0;

// ---------------------------------------------------------------- NF4 storage
// bitsandbytes quantize_4bit: blocksize defaults to 64; two 4-bit codes a byte.
inline constexpr int64_t kNf4BlockSize = 64;
// Double quantization (compress_statistics): the fp32 absmax values minus
// their mean ("offset", one fp32 scalar per tensor) are quantize_blockwise'd
// with blocksize=256 -> one uint8 per NF4 block and one fp32 absmax per 256 of
// them (bitsandbytes functional.py, quantize_4bit). The 256-entry dynamic code
// map is shared by all tensors and not counted.
inline constexpr int64_t kDoubleQuantBlockSize = 256;

// ---------------------------------------------------------------- optimizer state
// bitsandbytes Optimizer2State.init_state (optim/optimizer.py): blockwise 8-bit
// states use blocksize = 256 (older releases: 2048) with one fp32 absmax per
// block for each of the two states; tensors with fewer than min_8bit_size =
// 4096 elements keep fp32 states. Paged buffers (get_state_buffer) are only
// used for tensors with at least 1e5 elements; absmax is never paged.
inline constexpr int64_t kOptim8bitBlockSize = 256;
inline constexpr int64_t kOptimMin8bitSize = 4096;
inline constexpr int64_t kPagedMinElements = 100000;

// ---------------------------------------------------------------- loss
// The trainer's cross-entropy runs over chunks of this many tokens: each
// chunk's logits are produced in fp32 by the lm_head GEMM, turned into the
// gradient in place, cast once to the compute dtype for the backward GEMM,
// and freed, so the [tokens, vocab] logits never exist whole.
inline constexpr int64_t kCeChunkTokens = 1024;
// Bytes per logit of one chunk at the loss backward's peak: the fp32 logits,
// logits - lse and their exp are live together while exp runs (src/model/loss.cpp).
inline constexpr int64_t kCeChunkBytesPerLogit = 12;
// Index tensors a step keeps per token on the GPU: input ids, position ids and
// shifted labels (int64 each), and the loss's safe labels (int64), valid mask
// (bool) and logsumexp (fp32): 8 + 8 + 8 + 8 + 1 + 4.
inline constexpr int64_t kStepIndexBytesPerToken = 37;

// ---------------------------------------------------------------- runtime overheads
// An estimate for torch 2.11 + CUDA 13 with lazy module loading: ~620 MiB in
// use after CUDA initialisation, outside the caching allocator. Other GPUs and
// drivers differ by some tens of MiB; `qlora plan --measure` replaces it with
// the device's own figure.
inline constexpr double kCudaContextBytes = 621 * kMiB;
// ATen gives each cuBLAS and cuBLASLt handle (per stream) a workspace from the
// caching allocator (CublasHandlePool.cpp: getChosenWorkspaceSize, 32 MiB by
// default on sm_90, CUBLAS_WORKSPACE_CONFIG overrides), so the allocator's
// peak includes both: 64 MiB. Older GPUs get smaller defaults; the plan keeps
// the larger figure.
inline constexpr double kCublasBytes = 64 * kMiB;
// The caching allocator keeps freed blocks for reuse; blocks freed by one
// step's activations do not always fit the next request, more so with
// variable-length batches. A share of the memory that is allocated and freed
// every step (activations, backward temporaries, loss chunk) is set aside for
// that. The share is measured (`qlora plan --measure`, H100, bf16 unless said,
// 2026-11-25): max_memory_reserved - max_memory_allocated was
// 0.41 GiB at 1B 2×512, 0.32 at 4×1024 (bf16 and fp16), 1.29 at 8×2048, 0.42
// at 4×1024 all-linear, 0.27 at 2×512 without checkpointing, 1.23 at 8B
// 2×2048: 9% to 47% of the transient (median 23%). 25% puts the predicted
// reserved peak within -7%..+12% of those seven; the allocator's rounding is
// not modelled block by block.
inline constexpr double kFragmentationFraction = 0.25;
// Headroom below which a plan that fits is called tight.
inline constexpr double kTightHeadroomFraction = 0.05;

// ---------------------------------------------------------------- time
// Note [plan time model] (src/plan/time_estimate.cpp) adds the step's parts on the GPU: GEMMs at a
// fraction of the dense tensor peak, attention at another, the memory-bound passes at a fraction
// of the datasheet bandwidth, and a gap between kernels; the host, launching a kernel at a time,
// is a floor under that. The fractions were measured on an H200 (torch 2.11, cuBLAS, cuDNN),
// profiles of 8 × 2048 and the 8B at 2 × 2048 taken on 2026-12-03 (bench/results/
// 2026-12-03-h200-time-model): they stand for Hopper and are assumed elsewhere.
//
// cuBLAS on the step's GEMM shapes: 695 and 693 TFLOP/s of the H200's 989 in those profiles
// (660-835 per shape timed in-process on 2026-12-02: bench/results/2026-12-02-h200-gemm-backends).
inline constexpr double kGemmEfficiency = 0.70;
// cuDNN's flash attention on the FLOPs the plan counts for it (forward 2·S·H·d a token and
// layer, backward twice that): 287 TFLOP/s at head dim 64, 341 at 128.
inline constexpr double kAttentionEfficiency = 0.30;
// The element-wise kernels (norms, RoPE, SwiGLU, dropout, the LoRA passes, cross-entropy) and
// the NF4 dequantization, on the bytes Note [plan time model] counts: 3.1 TB/s of the H200's
// 4.8 (fitted, with kKernelGapSeconds, to what the two profiles leave after GEMMs and attention).
inline constexpr double kBandwidthEfficiency = 0.64;
// The GPU's idle time between two kernels launched back to back: 1.07 µs (the same fit).
inline constexpr double kKernelGapSeconds = 1.07e-6;
// The host's time to issue one kernel through ATen (dispatch, allocator, launch): a step can
// go no faster than its kernels × this. 9.9 µs from the host-bound 2 × 512 step (25 ms for
// about 2,550 kernels); that machine's host read 37% faster in one run than in an earlier one
// the same day (2026-12-02) at the shape without checkpointing, so this part moves with the CPU.
inline constexpr double kHostSecondsPerKernel = 9.9e-6;
// Offloaded checkpoints (Note [offloaded checkpoints]) cross the host link once each way a micro
// batch, beside the compute. Assumed, not yet measured here: 25 GB/s, what pinned copies reach
// on PCIe 4.0 x16 (PCIe 5.0 hosts such as H100 SXM machines reach about twice that).
inline constexpr double kHostLinkBytesPerSecond = 25e9;

// ---------------------------------------------------------------- advice
inline constexpr int64_t kSeqLengthStep = 128;  // suggested lengths are multiples of this
inline constexpr int64_t kMinAdviceSeqLength = 256;
inline constexpr int64_t kMinAdviceLoraR = 4;
inline constexpr int64_t kMaxAdviceMicroBatch = 1024;

}  // namespace qlora::plan
