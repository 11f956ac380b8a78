// train/threads: the CPU's intra-op thread count as a fixed input of a run's
// arithmetic.
//
// Note [fixed CPU threads]
// On the CPU a step's bits depend on how many threads share each ATen op, in
// two ways, both measured (LibTorch 2.11, 2-core AMD EPYC):
//  - a reduction of more than 32768 elements (ATen's grain) gives each thread
//    one slice and adds the slices' sums: a 1M-element sum has other bits for
//    each of 1, 2, 3 and 4 threads. The double quantization's offset (the mean
//    of a matrix's absmax values) is such a sum from 2M weights up.
//  - an element-wise op computes each thread's slice with vector code and the
//    slice's last partial vector with the scalar formula, which rounds
//    differently for exp-based ops: SiLU over [64, 4160] gives other bits with
//    3 or 6 threads than with 1, 2, 4, 5 or 8 (whose slices are whole vectors).
// (oneMKL's sgemm gave the same bits for 1 to 32 threads in every shape tried.)
//
// The team is not always the size at::get_num_threads() reports. With OpenMP's
// dynamic adjustment on (OMP_DYNAMIC=true), GNU OpenMP gives a parallel region
// at most (online CPUs - the 15-minute load average) threads: with 2 threads
// set and a load of 6.4 on 2 CPUs, 100 of 100 regions ran on 1 thread and the
// sum above came out with 1 thread's bits, and when the load falls the same
// run adds as 2 threads do. oneMKL's own adjustment (MKL_DYNAMIC) is on until
// at::set_num_threads turns it off. pin_cpu_threads turns both off and sets
// one count for ATen, OpenMP and oneMKL, so a step's arithmetic depends on its
// inputs and that count alone. The count itself still matters: an exact resume
// needs the same one (the checkpoint records it; a resume with another warns).
#pragma once

namespace qlora::train {

// Turns OpenMP's and oneMKL's dynamic thread adjustment off and sets `threads`
// intra-op threads (0: the current at::get_num_threads()) for the calling
// thread, which runs the CPU steps (CPU backward runs on the caller too).
// Returns the count now in force.
int pin_cpu_threads(int threads = 0);

// Whether OpenMP may currently run a parallel region started by this thread
// with fewer threads than the count (OMP_DYNAMIC / omp_set_dynamic).
bool openmp_dynamic_threads();

// Turns OpenMP's dynamic adjustment on or off for this thread, as OMP_DYNAMIC
// does for a process: for tests of the above. No-op without OpenMP.
void set_openmp_dynamic_threads(bool on);

}  // namespace qlora::train
