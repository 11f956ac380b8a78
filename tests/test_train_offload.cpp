// train: train.offload_checkpoints settled for a run (train::resolve_offload): auto as the plan
// decides for the device, off on the CPU, and the pinned host memory it needs checked against
// the machine's before anything is loaded (Note [offloaded checkpoints] in src/layer/offload.cpp).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "qlora/common/errors.h"
#include "qlora/config/config.h"
#include "qlora/model/decoder_config.h"
#include "qlora/train/measure.h"
#include "qlora/train/memory.h"
#include "qlora/train/setup.h"

namespace qlora::train {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// Llama-3.1-8B, one sequence of 32,768 tokens in bf16: 16 GiB of checkpoints (test_plan_offload.cpp).
Config long_run(const std::string& offload) {
  return default_config({"model.preset=llama-3.1-8b", "train.micro_batch_size=1", "train.gradient_accumulation_steps=1",
                         "data.max_seq_length=32768", "train.precision=bf16",
                         "train.offload_checkpoints=" + offload});
}

// A GPU as the driver would describe it; nothing here touches a device.
DeviceChoice gpu_of(double gib) {
  DeviceChoice d;
  d.device = c10::Device(c10::kCUDA, 0);
  d.precision = Precision::kBf16;
  d.gpu_name = "test GPU";
  d.gpu_total_bytes = gib * kGiB;
  d.cc_major = 9;
  return d;
}

TEST(Offload, AutoTurnsOnWhereOnlyItFitsAndSaysHowMuchHostMemory) {
  Config cfg = long_run("auto");
  const std::string line =
      resolve_offload(cfg, resolve_model_shape(cfg), gpu_of(24), 0, 1, 1, static_cast<int64_t>(64 * kGiB));
  EXPECT_EQ(cfg.train.offload_checkpoints, Offload::kOn);
  EXPECT_NE(line.find("train.offload_checkpoints auto"), std::string::npos) << line;
  EXPECT_NE(line.find("16.00 GiB of host memory"), std::string::npos) << line;
  Config roomy = long_run("auto");
  EXPECT_EQ(resolve_offload(roomy, resolve_model_shape(roomy), gpu_of(141), 0, 1, 1, 0), "");
  EXPECT_EQ(roomy.train.offload_checkpoints, Offload::kOff);
}

TEST(Offload, TooLittleHostMemoryIsRefusedBeforeTheRun) {
  Config cfg = long_run("true");
  try {
    resolve_offload(cfg, resolve_model_shape(cfg), gpu_of(80), 0, 2, 2, static_cast<int64_t>(24 * kGiB));
    FAIL() << "accepted 32 GiB of checkpoints with 24 GiB available";
  } catch (const InputError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("32.00 GiB of pinned host memory (2 processes on this host × 16.00 GiB)"), std::string::npos)
        << what;
    EXPECT_NE(what.find("train.offload_checkpoints: false"), std::string::npos) << what;
  }
  // Unknown host memory (0) is not checked; one process fits in 24 GiB.
  Config one = long_run("true");
  EXPECT_NO_THROW(resolve_offload(one, resolve_model_shape(one), gpu_of(80), 0, 1, 1, static_cast<int64_t>(24 * kGiB)));
  Config unknown = long_run("true");
  EXPECT_NO_THROW(resolve_offload(unknown, resolve_model_shape(unknown), gpu_of(80), 0, 2, 2, 0));
}

TEST(Offload, OffOnTheCpuAndWithoutCheckpointing) {
  Config cfg = long_run("true");
  DeviceChoice cpu;
  EXPECT_NE(resolve_offload(cfg, resolve_model_shape(cfg), cpu, 0, 1, 1, 0).find("has no effect here (it needs a GPU)"),
            std::string::npos);
  EXPECT_EQ(cfg.train.offload_checkpoints, Offload::kOff);
  Config plain = long_run("auto");
  plain.train.gradient_checkpointing = false;
  EXPECT_EQ(resolve_offload(plain, resolve_model_shape(plain), gpu_of(24), 0, 1, 1, 0), "");
  EXPECT_EQ(plain.train.offload_checkpoints, Offload::kOff);
}

// A YAML true / false is read for the enum's words; a typo is named with the choices.
TEST(Offload, ConfigReadsTrueFalseAndAuto) {
  EXPECT_EQ(default_config({"train.offload_checkpoints=true"}).train.offload_checkpoints, Offload::kOn);
  EXPECT_EQ(default_config({"train.offload_checkpoints=false"}).train.offload_checkpoints, Offload::kOff);
  EXPECT_EQ(default_config({}).train.offload_checkpoints, Offload::kAuto);
  EXPECT_THROW(default_config({"train.offload_checkpoints=ture"}), ConfigError);
  EXPECT_GT(host_available_bytes(), 0);  // this machine has /proc/meminfo
}

}  // namespace
}  // namespace qlora::train
