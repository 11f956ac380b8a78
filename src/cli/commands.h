// The subcommands. Each add_*_command registers its options on `root` and
// returns the function that runs it once parsing is done (its exit code).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "qlora/config/config.h"

namespace qlora::cli {

using Runner = std::function<int()>;

Runner add_config_command(CLI::App& root);
Runner add_plan_command(CLI::App& root);
Runner add_env_command(CLI::App& root);
Runner add_data_command(CLI::App& root);
Runner add_merge_command(CLI::App& root);
Runner add_train_command(CLI::App& root);
Runner add_demo_command(CLI::App& root);
Runner add_generate_command(CLI::App& root);
Runner add_chat_command(CLI::App& root);
Runner add_plot_command(CLI::App& root);
Runner add_export_command(CLI::App& root);

// --config FILE and repeated --set KEY=VALUE, shared by every command that
// reads a run config.
struct ConfigOptions {
  std::string path;
  std::vector<std::string> overrides;
};
void add_config_options(CLI::App& cmd, ConfigOptions& opts, bool required);
Config load_config_options(const ConfigOptions& opts);

}  // namespace qlora::cli
