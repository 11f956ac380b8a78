// The micro-batch finder: a search over probes, the divisor rule, the log line.
//
// Note [finder search]
// ~~~~~~~~~~~~~~~~~~~~
// Memory grows with the micro batch, so "fits" is true for 1..m and false
// above: the search looks for m with as few probes as it can, because each
// probe is a real forward + backward pass (seconds on an 8B model) and a
// failed one is an out-of-memory the allocator must recover from.
//   1. Probe s = the plan's prediction (clamped to [1, upper]). The plan is
//      usually close, so this first probe often decides most of the question.
//   2. s fits: double (capped at upper) while probes fit; the first failure f
//      and the last fit l bracket m, then bisect (l, f). Probes: about
//      log2(m / s) + log2(m / 2) at worst, 1 when s == upper.
//   3. s fails: bisect (0, s), 0 standing for "nothing known to fit"; it
//      reaches 1 when nothing larger fits, and if 1 fails too the result says
//      so (found = false). Probes: about log2(s).
// Every probe's result is kept; the bracket invariants mean no size is asked
// twice, and the cache makes that a guarantee rather than an argument.
//
// Note [finder divisor rule]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~
// The effective batch is micro × accumulation × GPUs, and per GPU it is
// E = config micro × config accumulation. A fitting m that does not divide E
// cannot keep it (accumulation E / m is not whole), so the micro batch used is
// the largest divisor of E that is <= m (at worst 1), and accumulation = E / it.
// That divisor is smaller than m, so it fits by the same monotonicity; it is
// not probed again.
#include "qlora/plan/finder.h"

#include <algorithm>
#include <map>

#include "format.h"
#include "qlora/common/errors.h"

namespace qlora::plan {
namespace {

using fmt::fixed;

constexpr double kGiBytes = 1024.0 * 1024.0 * 1024.0;

std::string gib1(double bytes) { return fixed(bytes / kGiBytes, 1); }

// "(peak 13.9 of 15.0 GiB)", or without the capacity when it is unknown.
std::string peak_text(double peak, double capacity) {
  return "(peak " + gib1(peak) + (capacity > 0 ? " of " + gib1(capacity) : std::string()) + " GiB)";
}

// "micro 4 × accumulation 8 = 32", "micro 4 × accumulation 8 × GPUs 2 = 64".
std::string product_text(int64_t micro, int64_t accumulation, int64_t world) {
  std::string s = "micro " + std::to_string(micro) + " × accumulation " + std::to_string(accumulation);
  if (world > 1) s += " × GPUs " + std::to_string(world);
  return s + " = " + std::to_string(micro * accumulation * world);
}

class CachedProbe {
 public:
  CachedProbe(const Probe& probe, std::vector<Trial>* trials) : probe_(probe), trials_(trials) {}

  const ProbeResult& operator()(int64_t micro) {
    auto it = cache_.find(micro);
    if (it != cache_.end()) return it->second;
    ProbeResult r = probe_(micro);
    trials_->push_back({micro, r});
    return cache_.emplace(micro, std::move(r)).first->second;
  }

 private:
  const Probe& probe_;
  std::vector<Trial>* trials_;
  std::map<int64_t, ProbeResult> cache_;
};

// Note [finder search]: the largest size in [1, upper] that fits, from `start`; 0 when 1 fails.
int64_t largest_fitting(int64_t start, int64_t upper, CachedProbe& fits_at) {
  int64_t lo = 0;  // largest size known to fit (0: none)
  int64_t hi = 0;  // smallest size known not to fit (0: none yet)
  if (fits_at(start).fits) {
    lo = start;
    while (lo < upper) {
      const int64_t next = std::min(upper, 2 * lo);
      if (!fits_at(next).fits) {
        hi = next;
        break;
      }
      lo = next;
    }
  } else {
    hi = start;
  }
  if (hi > 0)
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (fits_at(mid).fits)
        lo = mid;
      else
        hi = mid;
    }
  return lo;
}

}  // namespace

int64_t largest_divisor_at_most(int64_t n, int64_t limit) {
  for (int64_t d = std::min(n, limit); d > 1; --d)
    if (n % d == 0) return d;
  return 1;
}

std::optional<MicroAccumulation> oom_fallback(int64_t micro, int64_t accumulation) {
  if (micro <= 1 || accumulation < 1) return std::nullopt;
  // The largest proper divisor is micro / (its smallest prime factor).
  int64_t smallest_factor = micro;
  for (int64_t f = 2; f * f <= micro; ++f)
    if (micro % f == 0) {
      smallest_factor = f;
      break;
    }
  const int64_t next = micro / smallest_factor;
  return MicroAccumulation{next, accumulation * smallest_factor};
}

FinderInputs finder_inputs(const Plan& plan) {
  FinderInputs in;
  in.config_micro = plan.batch.micro;
  in.config_accumulation = plan.batch.accumulation;
  in.world = plan.batch.world;
  in.predicted_micro = plan.gpu ? std::max<int64_t>(1, plan.largest_micro_batch) : plan.batch.micro;
  in.device_capacity_bytes = plan.gpu ? plan.gpu->memory_bytes : 0;
  return in;
}

// Note [finder search], Note [finder divisor rule].
FinderResult find_micro_batch(const FinderInputs& in, const Probe& probe) {
  if (in.config_micro < 1 || in.config_accumulation < 1 || in.world < 1)
    throw InputError("micro-batch finder: micro batch, accumulation and GPUs must be at least 1, got " +
                     std::to_string(in.config_micro) + ", " + std::to_string(in.config_accumulation) + ", " +
                     std::to_string(in.world));
  const int64_t per_gpu = in.config_micro * in.config_accumulation;
  const int64_t upper = std::max<int64_t>(1, in.upper_bound > 0 ? in.upper_bound : per_gpu);
  const int64_t start = std::clamp<int64_t>(in.predicted_micro, 1, upper);

  FinderResult out;
  CachedProbe fits_at(probe, &out.trials);
  const int64_t lo = largest_fitting(start, upper, fits_at);

  const std::string config_text = "(config: micro " + std::to_string(in.config_micro) + " × accumulation " +
                                  std::to_string(in.config_accumulation) + ")";
  if (lo == 0) {
    const ProbeResult& one = fits_at(1);  // probed by the search above: a cache hit
    out.message = "micro batch 1 does not fit at the longest sequence" +
                  (in.device_capacity_bytes > 0 ? " on " + gib1(in.device_capacity_bytes) + " GiB" : std::string()) +
                  (one.error.empty() ? std::string() : " (" + one.error + ")") +
                  ": shorten data.max_seq_length, set train.gradient_checkpointing: true, or use a GPU with more "
                  "memory";
    return out;
  }

  const ProbeResult& best = fits_at(lo);  // a cache hit
  out.found = true;
  out.largest_fitting = lo;
  out.peak_allocated_bytes = best.peak_allocated_bytes;
  out.peak_reserved_bytes = best.peak_reserved_bytes;
  out.micro = largest_divisor_at_most(per_gpu, lo);
  out.accumulation = per_gpu / out.micro;

  std::string line = "micro batch " + std::to_string(lo) + " fits " +
                     peak_text(best.peak_allocated_bytes, in.device_capacity_bytes);
  if (out.micro == lo) {
    line += ": using " + product_text(out.micro, out.accumulation, in.world);
    if (lo == upper && upper == per_gpu) line += ", the whole batch per GPU in one pass";
  } else {
    line += "; accumulation " + std::to_string(per_gpu) + " / " + std::to_string(lo) + " = " +
            fixed(double(per_gpu) / double(lo), 2) + " is not whole: using " +
            product_text(out.micro, out.accumulation, in.world);
  }
  out.message = line + " " + config_text;
  return out;
}

SeqFinderResult find_max_seq(const SeqFinderInputs& in, const Probe& probe) {
  if (in.step < 1 || in.micro < 1 || in.upper_seq < in.step)
    throw InputError("sequence finder: the step (" + std::to_string(in.step) + ") and micro batch (" +
                     std::to_string(in.micro) + ") must be at least 1 and the longest length (" +
                     std::to_string(in.upper_seq) + ") at least the step");
  // In units of `step`: the same search as the micro batch's.
  const int64_t upper = in.upper_seq / in.step;
  const int64_t start = std::clamp<int64_t>(in.predicted_seq / in.step, 1, upper);
  SeqFinderResult out;
  std::vector<Trial> units;
  const Probe by_units = [&](int64_t n) { return probe(n * in.step); };
  CachedProbe fits_at(by_units, &units);
  const int64_t lo = largest_fitting(start, upper, fits_at);
  for (const Trial& t : units) out.trials.push_back({t.micro * in.step, t.result});
  const std::string where = in.device_capacity_bytes > 0 ? " on " + gib1(in.device_capacity_bytes) + " GiB" : "";
  if (lo == 0) {
    const ProbeResult& one = fits_at(1);
    out.message = "not even " + std::to_string(in.step) + " tokens fit at micro batch " + std::to_string(in.micro) +
                  where + (one.error.empty() ? std::string() : " (" + one.error + ")");
    return out;
  }
  const ProbeResult& best = fits_at(lo);
  out.found = true;
  out.seq = lo * in.step;
  out.peak_allocated_bytes = best.peak_allocated_bytes;
  out.peak_reserved_bytes = best.peak_reserved_bytes;
  out.message = "the longest sequence that trains at micro batch " + std::to_string(in.micro) + ": " +
                std::to_string(out.seq) + " tokens " + peak_text(best.peak_allocated_bytes, in.device_capacity_bytes) +
                (lo == upper ? ", the longest tried (" + std::to_string(in.upper_seq) + ")"
                             : ", " + std::to_string(out.seq + in.step) + " does not");
  return out;
}

int64_t largest_fitting_seq(const DecoderConfig& model, BudgetInputs in, const GpuSpec& gpu, int64_t upper,
                            int64_t step) {
  int64_t lo = 0, hi = step > 0 ? upper / step : 0;  // in steps
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    in.seq_length = mid * step;
    if (total_bytes(memory_components(model, in)) <= gpu.memory_bytes)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo * step;
}

}  // namespace qlora::plan
