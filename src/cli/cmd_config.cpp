// qlora config: validate a run config, print it resolved, or list the schema.
#include <iostream>
#include <memory>

#include "cli/commands.h"
#include "qlora/train/setup.h"

namespace qlora::cli {

Runner add_config_command(CLI::App& root) {
  struct Options {
    ConfigOptions config;
    bool print = false;
    bool json = false;
    bool schema = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = root.add_subcommand(
      "config", "check a config (all problems at once) and the files it names (model directory, tokenizer, "
                "data), print it resolved, or list every key");
  add_config_options(*cmd, opts->config, false);
  cmd->add_flag("--print", opts->print, "print the resolved config (every key, defaults filled in)");
  cmd->add_flag("--json", opts->json, "with --print: as JSON instead of YAML");
  cmd->add_flag("--schema", opts->schema, "list every key: type, default, what it does, aliases");

  return [opts]() {
    if (opts->schema) {
      std::cout << describe_schema();
      return 0;
    }
    const Config cfg = load_config_options(opts->config);
    if (opts->print) {
      std::cout << (opts->json ? to_json(cfg) + "\n" : to_yaml(cfg));
    } else {
      // The files it names, as `qlora train` will read them (no weights loaded).
      const std::vector<std::string> files = train::check_run_files(cfg);
      std::cout << cfg.source << ": valid\n";
      for (const auto& line : files) std::cout << "  " << line << "\n";
    }
    return 0;
  };
}

}  // namespace qlora::cli
