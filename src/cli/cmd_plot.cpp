// qlora plot RUN_DIR [--out FILE]: the run's loss curve (train, held-out, learning rate) as SVG.
#include <iostream>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "qlora/common/errors.h"
#include "qlora/common/text.h"
#include "qlora/train/plot.h"
#include "qlora/train/progress.h"

namespace qlora::cli {

Runner add_plot_command(CLI::App& root) {
  auto dir = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  CLI::App* cmd = root.add_subcommand(
      "plot", "draw a run's train and held-out loss (and learning rate) against the step, as an SVG");
  cmd->add_option("run_dir", *dir, "the run's output.dir (it holds metrics.jsonl)")->required();
  cmd->add_option("--out", *out, "the SVG file (default: RUN_DIR/loss.svg)");
  return [dir, out]() {
    const std::string path = out->empty() ? *dir + "/loss.svg" : *out;
    write_text_file(path, train::loss_plot_svg(train::MetricsLog::path_in(*dir), *dir));
    std::cout << "wrote " << path << " (open it in a browser)\n";
    return kExitOk;
  };
}

}  // namespace qlora::cli
