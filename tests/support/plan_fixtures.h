// Plans of presets for the plan tests (test_plan.cpp, test_plan_time.cpp).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "qlora/config/config.h"
#include "qlora/model/decoder_config.h"
#include "qlora/plan/plan.h"

namespace qlora::testing {

// The component `key` of plan p (throws when it has none).
inline const plan::Component& component(const plan::Plan& p, const std::string& key) {
  for (const auto& c : p.components)
    if (c.key == key) return c;
  throw std::runtime_error("no component " + key);
}

// The plan of model preset `preset` with the config keys `sets` on `gpu` (a preset or size;
// "": no GPU) for `world` processes.
inline plan::Plan plan_for(const std::string& preset, const std::string& gpu, std::vector<std::string> sets,
                           int64_t world = 1) {
  sets.push_back("model.preset=" + preset);
  const Config cfg = default_config(sets);
  if (gpu.empty()) return plan::make_plan(cfg, resolve_model_shape(cfg), nullptr, world);
  const plan::GpuSpec g = plan::resolve_gpu(gpu);
  return plan::make_plan(cfg, resolve_model_shape(cfg), &g, world);
}

}  // namespace qlora::testing
