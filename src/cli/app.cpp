#include "qlora/cli/app.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <exception>
#include <string>
#include <iostream>
#include <utility>
#include <vector>

#include "cli/commands.h"
#include "qlora/common/errors.h"
#include "qlora/common/text.h"
#include "qlora/plan/gpu.h"
#include "qlora/quant/nf4_cuda.h"
#include "qlora/train/threads.h"

namespace qlora::cli {

void add_config_options(CLI::App& cmd, ConfigOptions& opts, bool required) {
  auto* c = cmd.add_option("-c,--config", opts.path, "run config (.yaml or .json)");
  if (required) c->required();
  cmd.add_option("--set", opts.overrides,
                 "override a config key, typed by the schema (repeatable): --set train.micro_batch_size=4; "
                 "--set data.eval_path= (nothing after =) puts a key back to its default")
      ->allow_extra_args(false);
}

Config load_config_options(const ConfigOptions& opts) {
  return opts.path.empty() ? default_config(opts.overrides) : load_config(opts.path, opts.overrides);
}

namespace {

// "; did you mean 'train'?" for a plausible typo of a command, else "".
std::string closest_hint(const std::string& word, const std::vector<std::string>& names) {
  const std::string best = closest_match(word, names);
  return best.empty() ? "" : " (did you mean '" + best + "'?)";
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"qlora: QLoRA fine-tuning of open decoder models: Llama, Mistral, Qwen, Gemma, Phi (NF4 base, LoRA adapters)", "qlora"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("qlora ") + QLORA_VERSION);

  std::vector<std::pair<CLI::App*, Runner>> commands;
  auto remember = [&](Runner runner) { commands.emplace_back(app.get_subcommands({}).back(), std::move(runner)); };
  remember(add_demo_command(app));
  remember(add_train_command(app));
  remember(add_plan_command(app));
  remember(add_config_command(app));
  remember(add_data_command(app));
  remember(add_merge_command(app));
  remember(add_generate_command(app));
  remember(add_chat_command(app));
  remember(add_plot_command(app));
  remember(add_export_command(app));
  remember(add_env_command(app));

  if (argc >= 2 && argv[1][0] != '-') {
    std::vector<std::string> names;
    for (const CLI::App* sub : app.get_subcommands({})) names.push_back(sub->get_name());
    if (std::find(names.begin(), names.end(), argv[1]) == names.end()) {
      std::cerr << "error: unknown command '" << argv[1] << "'" << closest_hint(argv[1], names) << "; the commands are";
      for (const auto& n : names) std::cerr << " " << n;
      std::cerr << " (qlora --help says what each does)\n";
      return kExitBadInput;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);  // prints CLI11's message and the usage hint
    return kExitBadInput;
  }

  quant::register_cuda_kernels();  // no-op without CUDA
  // OMP_DYNAMIC / MKL_DYNAMIC off and the count pinned before any parallel work:
  // a step's bits then depend on the count alone, not on the machine's load
  // (Note [fixed CPU threads]).
  train::pin_cpu_threads();
  plan::register_config_checks();  // model.preset and hardware.gpu, listed with the config's other problems
  try {
    for (auto& [cmd, runner] : commands)
      if (cmd->parsed()) return runner();
    return kExitBadInput;  // unreachable: require_subcommand(1)
  } catch (const InputError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return kExitBadInput;
  } catch (const c10::Error& e) {
    // LibTorch's message without its C++ stack frames, which tell a user nothing.
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return kExitRuntimeFailure;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return kExitRuntimeFailure;
  }
}

}  // namespace qlora::cli
