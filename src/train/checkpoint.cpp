#include "qlora/train/checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <utility>

#include "qlora/layer/offload.h"
#include "qlora/layer/rng_state.h"
#include "qlora/model/decoder.h"

namespace qlora::train {
namespace {

using layer::capture_rng;
using layer::restore_rng;
using layer::RngState;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autocast settings of one device type, as torch.utils.checkpoint records them.
struct AutocastState {
  bool enabled = false;
  at::ScalarType dtype = at::kFloat;
};

AutocastState autocast_state(at::DeviceType type) {
  return {at::autocast::is_autocast_enabled(type), at::autocast::get_autocast_dtype(type)};
}

void set_autocast_state(at::DeviceType type, const AutocastState& s) {
  at::autocast::set_autocast_enabled(type, s.enabled);
  at::autocast::set_autocast_dtype(type, s.dtype);
}

// Puts the forward's autocast settings (the input's device type and the CPU)
// in place for the recomputation and the caller's back afterwards, as
// torch.autocast's enter / exit do (nesting count, cast cache cleared when
// the outermost region ends).
class AutocastReplay {
 public:
  AutocastReplay(at::DeviceType device, const AutocastState& dev_state, const AutocastState& cpu_state,
                 bool cache_enabled)
      : device_(device),
        dev_prev_(autocast_state(device)),
        cpu_prev_(autocast_state(at::kCPU)),
        cache_prev_(at::autocast::is_autocast_cache_enabled()) {
    set_autocast_state(at::kCPU, cpu_state);
    set_autocast_state(device_, dev_state);
    at::autocast::set_autocast_cache_enabled(cache_enabled);
    at::autocast::increment_nesting();
  }
  ~AutocastReplay() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_cache_enabled(cache_prev_);
    set_autocast_state(device_, dev_prev_);
    set_autocast_state(at::kCPU, cpu_prev_);
  }
  AutocastReplay(const AutocastReplay&) = delete;
  AutocastReplay& operator=(const AutocastReplay&) = delete;

 private:
  at::DeviceType device_;
  AutocastState dev_prev_, cpu_prev_;
  bool cache_prev_;
};

// The function travels to backward in ctx->saved_data, which holds IValues.
struct FnHolder : torch::CustomClassHolder {
  FnHolder(TensorFn f, std::shared_ptr<layer::CheckpointOffload> o, int64_t l)
      : fn(std::move(f)), offload(std::move(o)), layer(l) {}
  TensorFn fn;
  std::shared_ptr<layer::CheckpointOffload> offload;  // null: the input stays where it is
  int64_t layer = 0;
};

// Forward: fn(input) with grad off (Function::apply turns it off), keeping the
// input, the RNG state and the autocast settings. `anchor` is a scalar that
// requires grad exactly when the input does not (the first layer's
// input is the frozen embedding's output): without a grad-requiring input the
// output would carry no grad_fn, and the LoRA leaves inside fn would never get
// gradients. Backward: Note [Checkpoint RNG], then recompute and backprop.
struct CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& anchor,
                            const c10::intrusive_ptr<FnHolder>& holder, bool preserve_rng) {
    (void)anchor;
    const c10::Device device = input.device();
    if (preserve_rng) {
      RngState rng = capture_rng(device);
      ctx->saved_data["rng_cpu"] = rng.cpu;
      if (rng.cuda.defined()) ctx->saved_data["rng_cuda"] = rng.cuda;
    }
    const AutocastState dev = autocast_state(device.type());
    const AutocastState cpu = autocast_state(at::kCPU);
    ctx->saved_data["autocast_dev_enabled"] = dev.enabled;
    ctx->saved_data["autocast_dev_dtype"] = static_cast<int64_t>(dev.dtype);
    ctx->saved_data["autocast_cpu_enabled"] = cpu.enabled;
    ctx->saved_data["autocast_cpu_dtype"] = static_cast<int64_t>(cpu.dtype);
    ctx->saved_data["autocast_cache"] = at::autocast::is_autocast_cache_enabled();
    ctx->saved_data["preserve_rng"] = preserve_rng;
    ctx->saved_data["fn"] = at::IValue::make_capsule(holder);
    if (holder->offload) {  // Note [offloaded checkpoints] in src/layer/offload.cpp
      at::Tensor out = holder->fn(input);
      ctx->saved_data["offloaded"] = at::IValue::make_capsule(
          c10::make_intrusive<layer::OffloadHandle>(holder->offload, holder->offload->stash(holder->layer, {input})));
      return out;
    }
    ctx->save_for_backward({input});
    return holder->fn(input);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto& data = ctx->saved_data;
    at::Tensor input;
    if (const auto it = data.find("offloaded"); it != data.end()) {
      const auto h = c10::static_intrusive_pointer_cast<layer::OffloadHandle>(it->second.toCapsule());
      input = h->offload->fetch(h->entry).front();
    } else {
      input = ctx->get_saved_variables()[0];
    }
    const at::Tensor& grad_out = grad_outputs[0];
    const bool need_input_grad = ctx->needs_input_grad(0);
    variable_list grads(4);
    if (!grad_out.defined()) return grads;

    const auto holder = c10::static_intrusive_pointer_cast<FnHolder>(data["fn"].toCapsule());
    const c10::Device device = input.device();
    const bool preserve_rng = data["preserve_rng"].toBool();

    at::Tensor x = input.detach();
    x.requires_grad_(need_input_grad);
    at::Tensor out;
    {
      RngState found;
      if (preserve_rng) {
        found = capture_rng(device);
        RngState forward_state;
        forward_state.cpu = data["rng_cpu"].toTensor();
        if (data.count("rng_cuda")) forward_state.cuda = data["rng_cuda"].toTensor();
        restore_rng(forward_state, device);
      }
      // Puts back the state backward found, also when fn throws.
      struct RngRestore {
        const RngState* s;
        c10::Device device;
        ~RngRestore() {
          if (s->cpu.defined()) restore_rng(*s, device);
        }
      } restore{&found, device};

      AutocastReplay autocast(
          device.type(),
          {data["autocast_dev_enabled"].toBool(), static_cast<at::ScalarType>(data["autocast_dev_dtype"].toInt())},
          {data["autocast_cpu_enabled"].toBool(), static_cast<at::ScalarType>(data["autocast_cpu_dtype"].toInt())},
          data["autocast_cache"].toBool());
      at::AutoGradMode grad_on(true);
      out = holder->fn(x);
    }
    // backward (not grad): accumulates into the .grad of every leaf fn used
    // (the LoRA matrices) and of x.
    if (out.requires_grad()) torch::autograd::backward({out}, {grad_out});
    if (need_input_grad) grads[0] = x.grad();
    return grads;
  }
};

// ---------------------------------------------------------------- counting allocator

// Note [Counting CPU allocator]
// Each block is [64-byte header | data]; the header holds the data size, so
// the deleter (a plain function: storage may outlive every counter) can
// subtract it. 64 bytes keep the data at c10's CPU alignment.
constexpr size_t kHeaderBytes = 64;
// SetCPUAllocator only replaces an allocator of lower or equal priority.
constexpr uint8_t kCounterPriority = 255;

std::atomic<int64_t> g_live_bytes{0};

void counted_free(void* data) {
  if (data == nullptr) return;
  char* base = static_cast<char*>(data) - kHeaderBytes;
  size_t n = 0;
  std::memcpy(&n, base, sizeof n);
  g_live_bytes.fetch_sub(static_cast<int64_t>(n), std::memory_order_relaxed);
  c10::free_cpu(base);
}

class CountingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    char* base = static_cast<char*>(c10::alloc_cpu(n + kHeaderBytes));
    std::memcpy(base, &n, sizeof n);
    g_live_bytes.fetch_add(static_cast<int64_t>(n), std::memory_order_relaxed);
    void* data = base + kHeaderBytes;
    return {data, data, &counted_free, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &counted_free; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

std::mutex g_install_mutex;
int g_counters = 0;
c10::Allocator* g_previous = nullptr;

c10::Allocator* counting_allocator() {
  static auto* alloc = new CountingCpuAllocator();  // never destroyed: storage may outlive statics
  return alloc;
}

}  // namespace

// ---------------------------------------------------------------- public API

at::Tensor checkpoint(const TensorFn& fn, const at::Tensor& input, const CheckpointOptions& options, int64_t layer) {
  TORCH_CHECK(fn, "checkpoint: the function is empty");
  TORCH_CHECK(input.defined(), "checkpoint: the input is undefined");
  if (!at::GradMode::is_enabled()) return fn(input);
  // Always defined (autograd records every tensor argument's metadata); it
  // requires grad only when the input does not.
  at::Tensor anchor = at::empty({}, input.options().dtype(at::kFloat));
  if (!input.requires_grad()) anchor.requires_grad_(true);
  return CheckpointFunction::apply(input, anchor, c10::make_intrusive<FnHolder>(fn, options.offload, layer),
                                   options.preserve_rng_state);
}

LayerForwardFn checkpointed_layer_forward(const model::DecoderModel& model, const CheckpointOptions& options) {
  const model::DecoderModel* m = &model;  // must outlive every backward
  return [m, options](int64_t layer, const at::Tensor& hidden, const std::pair<at::Tensor, at::Tensor>& cos_sin,
                      const model::AttentionInputs& attention) {
    // By value: backward runs after this call has returned.
    return checkpoint(
        [m, layer, cos_sin, attention](const at::Tensor& h) { return m->layer_forward(layer, h, cos_sin, attention); },
        hidden, options, layer);
  };
}

at::Tensor checkpointed_forward_hidden(const model::DecoderModel& model, const at::Tensor& input_ids,
                                       const model::AttentionInputs& attention, bool checkpointing,
                                       const CheckpointOptions& options) {
  if (!checkpointing) return model.forward_hidden(input_ids, attention);
  TORCH_CHECK(input_ids.dim() == 2, "input_ids must be [B, T], got ", input_ids.dim(), "-D");
  const LayerForwardFn layer = checkpointed_layer_forward(model, options);
  at::Tensor x = model.embed(input_ids);  // [B, T, h]
  const auto cos_sin = model.rope(attention.position_ids);
  for (int64_t l = 0; l < model.num_layers(); ++l) x = layer(l, x, cos_sin, attention);
  return model.final_norm(x);
}

SavedBytesCounter::SavedBytesCounter() {
  std::lock_guard<std::mutex> lock(g_install_mutex);
  if (g_counters++ == 0) {
    g_previous = c10::GetCPUAllocator();
    c10::SetCPUAllocator(counting_allocator(), kCounterPriority);
    TORCH_CHECK(c10::GetCPUAllocator() == counting_allocator(),
                "SavedBytesCounter: could not install the counting CPU allocator");
  }
  base_ = g_live_bytes.load();
}

SavedBytesCounter::~SavedBytesCounter() {
  std::lock_guard<std::mutex> lock(g_install_mutex);
  if (--g_counters == 0) c10::SetCPUAllocator(g_previous, kCounterPriority);
}

int64_t SavedBytesCounter::live_bytes() const { return g_live_bytes.load() - base_; }

}  // namespace qlora::train
