// qlora data: load, tokenize and mask the training (and eval) data of a config
// exactly as training will, and say what was kept, cut and skipped.
//
//   qlora data --config run.yaml [--tokenizer DIR_OR_FILE] [--json]
//
// The tokenizer is the model's (model.path), or --tokenizer. A bad line stops
// with "<file>:<line>: <problem>" and exit code 2, unless data.skip_bad_lines.
#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "qlora/common/errors.h"
#include "qlora/data/dataset.h"
#include "qlora/data/tokenizer.h"

namespace qlora::cli {
namespace {

struct DataOptions {
  ConfigOptions config;
  std::string tokenizer;
  bool json = false;
};

nlohmann::ordered_json summary_json(const data::DataSummary& s) {
  return {{"source", s.source},
          {"format", std::string(to_string(s.format))},
          {"examples", s.examples},
          {"lines", s.lines},
          {"blank_lines", s.blank_lines},
          {"truncated", s.truncated},
          {"dropped_too_long", s.dropped_too_long},
          {"skipped_lines", s.skipped_total()},
          {"tokens", s.tokens},
          {"trained_tokens", s.trained_tokens},
          {"longest", s.longest}};
}

}  // namespace

Runner add_data_command(CLI::App& root) {
  auto opts = std::make_shared<DataOptions>();
  CLI::App* cmd = root.add_subcommand(
      "data", "tokenize and mask the config's data as training will; report kept, truncated and skipped examples");
  add_config_options(*cmd, opts->config, /*required=*/true);
  cmd->add_option("--tokenizer", opts->tokenizer,
                  "tokenizer.json / tokenizer.model or a model directory (default: model.path)");
  cmd->add_flag("--json", opts->json, "print the summaries as JSON");
  return [opts]() {
    const Config cfg = load_config_options(opts->config);
    const std::string tok_path = opts->tokenizer.empty() ? cfg.model.path : opts->tokenizer;
    if (tok_path.empty())
      throw InputError(cfg.source + ": no tokenizer: set model.path to the model directory or pass --tokenizer");
    if (cfg.data.path.empty()) throw InputError(cfg.source + ": data.path: set it to a JSONL file");
    const std::unique_ptr<data::Tokenizer> tokenizer = data::load_tokenizer(tok_path);
    const data::TrainEval sets =
        data::load_train_eval(cfg.data, static_cast<uint64_t>(cfg.train.seed), *tokenizer);
    if (opts->json) {
      nlohmann::ordered_json j = {{"tokenizer", tokenizer->kind()}, {"train", summary_json(sets.train.summary)}};
      j["eval"] = sets.eval.examples.empty() ? nlohmann::ordered_json() : summary_json(sets.eval.summary);
      std::cout << j.dump(2) << "\n";
      return kExitOk;
    }
    std::cout << "tokenizer  " << tokenizer->kind() << " (" << tok_path << "), vocab " << tokenizer->vocab_size()
              << "\ntrain      " << sets.train.summary.describe() << "\n";
    if (!sets.eval.examples.empty()) std::cout << "eval       " << sets.eval.summary.describe() << "\n";
    return kExitOk;
  };
}

}  // namespace qlora::cli
