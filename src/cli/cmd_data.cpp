// qlora data: load, tokenize and mask the training (and eval) data of a config
// exactly as training will, and say what was kept, cut and skipped.
//
//   qlora data --config run.yaml [--tokenizer DIR_OR_FILE] [--json] [--show N] [--dump FILE]
//
// --show N prints the first N training examples as the model sees them, the
// trained spans marked ([[...]] or, on a terminal, green), with the token
// count of each part; --dump FILE writes every example as JSONL (input_ids,
// labels with -100 where not trained, the source line, train or eval).
//
// The tokenizer is the model's (model.path), or --tokenizer. A bad line stops
// with "<file>:<line>: <problem>" and exit code 2, unless data.skip_bad_lines.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

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
  int64_t show = 0;
  std::string dump;
};

// One example as text, the trained spans marked, and a line of counts per
// part ("prompt 21 tokens | trained 6 | prompt 3 | trained 4").
void show_example(std::ostream& os, const data::TokenizedExample& ex, const data::Tokenizer& tok, int64_t index,
                  bool colour) {
  const char* open = colour ? "\033[32m" : "[[";
  const char* close = colour ? "\033[0m" : "]]";
  std::string text, counts;
  int64_t trained = 0;
  for (size_t i = 0; i < ex.input_ids.size();) {
    const bool on = ex.labels[i] != data::kIgnoreIndex;
    size_t j = i;
    std::vector<int32_t> span;
    while (j < ex.input_ids.size() && (ex.labels[j] != data::kIgnoreIndex) == on) span.push_back(ex.input_ids[j++]);
    const std::string piece = tok.decode(span);
    text += on ? open + piece + close : piece;
    counts += std::string(counts.empty() ? "" : " | ") + (on ? "trained " : "not trained ") + std::to_string(span.size());
    if (on) trained += static_cast<int64_t>(span.size());
    i = j;
  }
  os << "--- example " << index << " (line " << ex.line << "): " << ex.size() << " tokens, " << trained << " trained"
     << (ex.truncated ? ", truncated to data.max_seq_length" : "") << "\n"
     << text << "\n(" << counts << ")\n";
}

void dump_examples(const std::string& path, const data::TrainEval& sets) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw InputError("--dump " + path + ": cannot open it for writing");
  for (const auto& [split, set] : {std::pair<const char*, const data::Dataset*>{"train", &sets.train}, {"eval", &sets.eval}})
    for (const auto& ex : set->examples)
      out << nlohmann::ordered_json{{"split", split}, {"line", ex.line}, {"input_ids", ex.input_ids},
                                    {"labels", ex.labels}}
                 .dump()
          << "\n";
  out.flush();
  if (!out) throw std::runtime_error("--dump " + path + ": write failed (disk full?)");
}

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
  cmd->add_option("--show", opts->show,
                  "print the first N training examples as the model sees them, trained spans marked")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--dump", opts->dump,
                  "write every example as JSONL: input_ids, labels (-100 where not trained), line, split");
  return [opts]() {
    const Config cfg = load_config_options(opts->config);
    const std::string tok_path = opts->tokenizer.empty() ? cfg.model.path : opts->tokenizer;
    if (tok_path.empty())
      throw InputError(cfg.source + ": no tokenizer: set model.path to the model directory or pass --tokenizer");
    if (cfg.data.path.empty()) throw InputError(cfg.source + ": data.path: set it to a JSONL file");
    const std::unique_ptr<data::Tokenizer> tokenizer = data::load_tokenizer(tok_path);
    const data::TrainEval sets =
        data::load_train_eval(cfg.data, static_cast<uint64_t>(cfg.train.seed), *tokenizer);
    if (!opts->dump.empty()) dump_examples(opts->dump, sets);
    if (opts->json) {
      nlohmann::ordered_json j = {{"tokenizer", tokenizer->kind()}, {"train", summary_json(sets.train.summary)}};
      j["eval"] = sets.eval.examples.empty() ? nlohmann::ordered_json() : summary_json(sets.eval.summary);
      std::cout << j.dump(2) << "\n";
      return kExitOk;
    }
    std::cout << "tokenizer  " << tokenizer->kind() << " (" << tok_path << "), vocab " << tokenizer->vocab_size()
              << "\ntrain      " << sets.train.summary.describe() << "\n";
    if (!sets.eval.examples.empty()) std::cout << "eval       " << sets.eval.summary.describe() << "\n";
    if (!opts->dump.empty())
      std::cout << "dump       " << sets.train.examples.size() + sets.eval.examples.size() << " examples to "
                << opts->dump << "\n";
    const bool colour = isatty(STDOUT_FILENO) != 0 && std::getenv("NO_COLOR") == nullptr;
    const size_t n = std::min(static_cast<size_t>(opts->show), sets.train.examples.size());
    for (size_t i = 0; i < n; ++i) show_example(std::cout, sets.train.examples[i], *tokenizer, static_cast<int64_t>(i + 1), colour);
    return kExitOk;
  };
}

}  // namespace qlora::cli
