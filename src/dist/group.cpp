// The one translation unit that sees c10d's backends. USE_C10D_GLOO /
// USE_C10D_NCCL are defined for this file only, by CMake, when the build found
// gloo's headers (Debian's libgloo-dev) or nccl.h (a CUDA build): LibTorch
// carries both backends compiled in, but its wheel ships neither library's
// headers.
#include "qlora/dist/group.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdlib>
#include <map>
#include <stdexcept>
#include <utility>

#include "qlora/common/errors.h"

namespace qlora::dist {

struct Group::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  c10::Device comm_device = c10::Device(c10::kCPU);  // where tensors must be for the backend

  void wait(const c10::intrusive_ptr<c10d::Work>& work) const { work->wait(); }
};

namespace {

#ifdef USE_C10D_GLOO
std::shared_ptr<gloo::transport::Device> gloo_device(const Launch& launch) {
  // GLOO_SOCKET_IFNAME picks the interface, as in torch.distributed; a
  // loopback rendezvous keeps a single-host run on loopback; otherwise the
  // interface this host's name resolves to.
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname != nullptr && *ifname != '\0')
    return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
  const std::string& a = launch.master_addr;
  if (a == "localhost" || a.rfind("127.", 0) == 0) return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  return c10d::ProcessGroupGloo::createDefaultDevice();
}
#endif

}  // namespace

std::string unavailable_reason(c10::Device device) {
  if (device.is_cuda()) {
#ifdef USE_C10D_NCCL
    return "";
#else
#ifdef USE_C10D_GLOO
    return "";  // Gloo through host copies (slow, but correct)
#else
    return "this build has neither NCCL nor Gloo headers; on the GPU machine build with QLORA_CUDA=ON against a "
           "torch with nccl.h (scripts/gpu.sh), or install libgloo-dev and rebuild";
#endif
#endif
  }
#ifdef USE_C10D_GLOO
  return "";
#else
  return "this build has no Gloo (CPU data parallelism): install the Debian package libgloo-dev (bash "
         "scripts/setup.sh does) and rebuild";
#endif
}

Group::Group() = default;
Group::~Group() = default;
Group::Group(Group&&) noexcept = default;
Group& Group::operator=(Group&&) noexcept = default;

Group Group::connect(const Launch& launch, c10::Device device, DistBackend backend,
                     std::chrono::milliseconds timeout) {
  Group g;
  if (!launch.distributed()) return g;
  if (backend == DistBackend::kNccl && !device.is_cuda())
    throw InputError("distributed.backend: nccl needs GPUs, and this run is on the CPU; use gloo or auto");
  const bool want_gloo = backend == DistBackend::kGloo || !device.is_cuda();
  if (const std::string why = unavailable_reason(want_gloo ? c10::Device(c10::kCPU) : device); !why.empty())
    throw InputError("WORLD_SIZE " + std::to_string(launch.world_size) + " (" + launch.source + "): " + why);
  g.impl_ = std::make_unique<Impl>();
  g.rank_ = launch.rank;
  g.world_ = launch.world_size;

  c10d::TCPStoreOptions so;
  so.port = static_cast<std::uint16_t>(launch.master_port);
  so.isServer = launch.rank == 0 && !launch.agent_store;
  // Every rank (clients too) counts itself in, and all wait for the world.
  so.numWorkers = static_cast<std::size_t>(launch.world_size);
  so.waitWorkers = true;
  so.timeout = timeout;
  try {
    auto tcp = c10::make_intrusive<c10d::TCPStore>(launch.master_addr, so);
    g.impl_->store = c10::make_intrusive<c10d::PrefixStore>("qlora/" + launch.restart + "/", tcp);
  } catch (const std::exception& e) {
    throw std::runtime_error("rank " + std::to_string(launch.rank) + ": rendezvous at " + launch.master_addr + ":" +
                             std::to_string(launch.master_port) + " failed (" + e.what() +
                             "). Check that every rank got the same MASTER_ADDR/MASTER_PORT, that rank 0's host is "
                             "reachable and the port free.");
  }

  const int rank = static_cast<int>(launch.rank);
  const int world = static_cast<int>(launch.world_size);
#ifdef USE_C10D_NCCL
  if (!want_gloo) {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device.index()));
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    g.impl_->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(g.impl_->store, rank, world, opts);
    g.impl_->comm_device = device;
    g.backend_name_ = "nccl";
    return g;
  }
#endif
#ifdef USE_C10D_GLOO
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  opts->devices.push_back(gloo_device(launch));
  g.impl_->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(g.impl_->store, rank, world, opts);
  g.backend_name_ = "gloo";
#endif
  return g;
}

namespace {

// One scalar summed over ranks, through a one-element tensor on the backend's device.
template <typename T>
T sum_scalar(c10d::Backend& backend, c10::Device device, T v, at::ScalarType dtype) {
  std::vector<at::Tensor> ts{at::full({1}, v, at::TensorOptions().dtype(dtype).device(device))};
  backend.allreduce(ts)->wait();
  return ts[0].to(at::kCPU).item<T>();
}

}  // namespace

int64_t Group::sum(int64_t v) const {
  return distributed() ? sum_scalar(*impl_->backend, impl_->comm_device, v, at::kLong) : v;
}

double Group::sum(double v) const {
  return distributed() ? sum_scalar(*impl_->backend, impl_->comm_device, v, at::kDouble) : v;
}

void Group::all_reduce_sum(const std::vector<at::Tensor>& tensors) const {
  if (!distributed() || tensors.empty()) return;
  // One flat bucket per dtype, in the order given (the same on every rank).
  std::map<at::ScalarType, std::vector<at::Tensor>> by_dtype;
  for (const auto& t : tensors) by_dtype[t.scalar_type()].push_back(t);
  for (auto& [dtype, group] : by_dtype) {
    std::vector<at::Tensor> flat;
    flat.reserve(group.size());
    for (const auto& t : group) flat.push_back(t.reshape({-1}).to(impl_->comm_device));
    std::vector<at::Tensor> bucket{at::cat(flat)};  // [sum of numel]
    impl_->wait(impl_->backend->allreduce(bucket));
    int64_t offset = 0;
    for (const auto& t : group) {
      const int64_t n = t.numel();
      t.copy_(bucket[0].narrow(0, offset, n).view(t.sizes()));
      offset += n;
    }
  }
}

std::vector<at::Tensor> Group::all_gather(const at::Tensor& t) const {
  if (!distributed()) return {t.clone()};
  std::vector<at::Tensor> in{t.contiguous().to(impl_->comm_device)};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int64_t r = 0; r < world_; ++r) out[0].push_back(at::empty_like(in[0]));
  impl_->wait(impl_->backend->allgather(out, in));
  std::vector<at::Tensor> result;
  for (auto& x : out[0]) result.push_back(x.to(t.device()));
  return result;
}

void Group::barrier() const {
  if (!distributed()) return;
  impl_->wait(impl_->backend->barrier());
}

}  // namespace qlora::dist
