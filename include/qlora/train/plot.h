// train/plot: a run's loss curve as an SVG a browser shows (`qlora plot`, and loss.svg written
// beside metrics.jsonl at the end of every run): train loss and held-out loss against the step,
// the learning rate on a second axis.
#pragma once

#include <string>

namespace qlora::train {

// The SVG of metrics.jsonl at `metrics_path` (lines that do not parse are skipped, as after a
// kill). Throws InputError naming the file when it is missing or holds no training step.
std::string loss_plot_svg(const std::string& metrics_path, const std::string& title);

}  // namespace qlora::train
