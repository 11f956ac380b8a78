#include "qlora/data/dataset.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "qlora/common/input_files.h"
#include "qlora/common/text.h"
#include "qlora/data/chat_template.h"
#include "qlora/data/shuffle.h"
#include "qlora/data/tokenizer.h"

namespace qlora::data {

int64_t DataSummary::skipped_total() const {
  int64_t n = 0;
  for (int64_t c : skipped) n += c;
  return n;
}

std::string DataSummary::describe() const {
  std::ostringstream os;
  os << source << ": " << examples << " examples (" << to_string(format);
  if (format == DataFormat::kChat) {
    os << ", " << (chat_template == ChatTemplate::kModel ? "the model's chat template, " + chat_template_origin
                                                          : chat_template_origin);
  }
  os << "), " << tokens << " tokens, " << trained_tokens << " trained, longest " << longest;
  if (truncated > 0) os << "; " << truncated << " truncated to max_seq_length";
  if (segment_wise > 0) {
    os << "; " << segment_wise << " tokenized segment by segment (a token straddled the "
       << "prompt/response boundary)";
  }
  if (blank_lines > 0) os << "; " << blank_lines << " blank lines ignored";
  if (skipped_total() > 0) {
    os << "; skipped " << skipped_total() << " bad lines (";
    bool first = true;
    for (int i = 0; i < kNumLineProblems; ++i) {
      if (skipped[static_cast<size_t>(i)] == 0) continue;
      os << (first ? "" : ", ") << to_string(static_cast<LineProblem>(i)) << ": "
         << skipped[static_cast<size_t>(i)];
      first = false;
    }
    os << ")";
  }
  return os.str();
}

LoadOptions LoadOptions::from(const DataConfig& cfg) {
  LoadOptions o;
  o.format = cfg.format;
  o.chat_template = cfg.chat_template;
  o.train_on = cfg.train_on;
  o.train_reasoning = cfg.train_reasoning;
  o.fold_system_prompt = cfg.fold_system_prompt;
  o.max_seq_length = cfg.max_seq_length;
  o.train_on_inputs = cfg.train_on_inputs;
  o.skip_bad_lines = cfg.skip_bad_lines;
  return o;
}

namespace {

bool is_blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; });
}

// Cuts to max_len; throws kTooLong when no trained label survives.
void truncate(TokenizedExample& ex, int64_t max_len) {
  if (ex.size() <= max_len) return;
  const int64_t before = count_trained(ex);
  ex.input_ids.resize(static_cast<size_t>(max_len));
  ex.labels.resize(static_cast<size_t>(max_len));
  ex.truncated = true;
  if (before > 0 && count_trained(ex) == 0) {
    throw LineError(LineProblem::kTooLong,
                    "the example has " + std::to_string(before) +
                        " trained tokens, all beyond data.max_seq_length = " +
                        std::to_string(max_len) +
                        " (the prompt alone fills it); raise data.max_seq_length, shorten the "
                        "prompt, or set data.skip_bad_lines: true to drop such lines");
  }
}

// The format a line's keys say when data.format names another one (kAuto otherwise, and for a
// line that is no format at all): a line that lacks a field of data.format's format then gets
// "this file looks like chat messages: use data.format: chat".
DataFormat other_format(std::string_view line, DataFormat format) {
  if (format == DataFormat::kAuto) return DataFormat::kAuto;
  try {
    const DataFormat seen = detect_format(line);
    return seen == format ? DataFormat::kAuto : seen;
  } catch (const LineError&) {
    return DataFormat::kAuto;
  }
}

std::string looks_like(DataFormat f) {
  switch (f) {
    case DataFormat::kChat: return "chat messages";
    case DataFormat::kAlpaca: return "Alpaca instructions";
    case DataFormat::kCompletion: return "prompt/completion pairs";
    default: return "plain text";
  }
}

// The directory whose chat template a chat file is rendered with: the option, else the
// tokenizer's own directory (transformers keeps the template with the tokenizer).
std::string chat_template_dir(const LoadOptions& options, const Tokenizer& tokenizer) {
  if (!options.chat_template_dir.empty()) return options.chat_template_dir;
  if (tokenizer.path().empty()) return "";
  std::error_code ec;
  const std::filesystem::path p(tokenizer.path());
  return std::filesystem::is_directory(p, ec) ? p.string() : p.parent_path().string();
}

// data.train_on and data.train_reasoning say what of a chat is trained; set for another format
// they would be ignored, so they are refused.
void require_not_chat_options(const LoadOptions& options, DataFormat format, std::string_view source) {
  const std::string what = options.train_on != TrainOn::kAllAssistant ? "data.train_on"
                           : !options.train_reasoning                  ? "data.train_reasoning"
                                                                        : "";
  if (what.empty()) return;
  throw InputError(std::string(source) + " holds " + std::string(to_string(format)) + " data, but " + what +
                   " applies to chat data only; remove it (data.train_on_inputs says what of a prompt is trained)");
}

}  // namespace

Dataset load_jsonl_text(std::string_view text, std::string_view source, const LoadOptions& options,
                        const Tokenizer& tokenizer) {
  if (options.max_seq_length < 2) {
    throw InputError("data.max_seq_length must be at least 2, got " +
                     std::to_string(options.max_seq_length));
  }
  Dataset out;
  DataSummary& s = out.summary;
  s.source = std::string(source);
  DataFormat format = options.format;  // kAuto until the first valid line decides
  ChatRendering chat;                  // resolved once the format is chat
  const auto resolve = [&]() {
    const std::string dir = chat_template_dir(options, tokenizer);
    const bool wants_model = options.chat_template == ChatTemplate::kAuto || options.chat_template == ChatTemplate::kModel;
    chat = resolve_chat(options.chat_template, options.train_on, options.train_reasoning, tokenizer,
                        wants_model && !dir.empty() ? load_model_chat(dir) : nullptr, dir);
    chat.fold_system_prompt = options.fold_system_prompt;
  };
  if (format == DataFormat::kChat) resolve();
  if (format != DataFormat::kChat && format != DataFormat::kAuto) require_not_chat_options(options, format, source);

  size_t pos = 0;
  int64_t line_no = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    ++s.lines;
    if (line_no == 1 && line.substr(0, 3) == "\xEF\xBB\xBF") line.remove_prefix(3);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (is_blank(line)) {
      ++s.blank_lines;
      continue;
    }
    try {
      if (format == DataFormat::kAuto) {
        const DataFormat detected = detect_format(line);
        if (detected == DataFormat::kChat) resolve();
        if (detected != DataFormat::kChat) require_not_chat_options(options, detected, source);
        format = detected;  // only once a line parsed: a bad first line decides nothing
      }
      RenderedExample rendered = render_line(line, format, chat);
      TokenizedExample ex = tokenize_example(rendered, tokenizer, options.train_on_inputs);
      ex.line = line_no;
      if (count_trained(ex) == 0) {
        throw LineError(LineProblem::kEmpty,
                        "the example has no token to train on after tokenization");
      }
      truncate(ex, options.max_seq_length);
      s.truncated += ex.truncated;
      s.segment_wise += ex.segment_wise;
      s.tokens += ex.size();
      s.trained_tokens += count_trained(ex);
      s.longest = std::max(s.longest, ex.size());
      out.examples.push_back(std::move(ex));
    } catch (const LineError& e) {
      if (!options.skip_bad_lines) {
        const bool missing = e.problem() == LineProblem::kMissingField;
        const DataFormat other = missing ? other_format(line, options.format) : DataFormat::kAuto;
        std::string advice;
        if (other != DataFormat::kAuto) {
          advice = std::string(": this ") + (out.examples.empty() ? "file" : "line") + " looks like " +
                   looks_like(other) + ": use data.format: " + std::string(to_string(other));
        } else {
          if (missing) advice = "; every line of a file must use the same format";
          if (e.problem() != LineProblem::kTooLong)
            advice += " (or set data.skip_bad_lines: true to skip and count such lines)";
        }
        throw InputError(s.source + ":" + std::to_string(line_no) + ": " + e.what() + advice);
      }
      ++s.skipped[static_cast<size_t>(e.problem())];
      if (e.problem() == LineProblem::kTooLong) ++s.dropped_too_long;
    }
  }
  s.examples = static_cast<int64_t>(out.examples.size());
  s.format = format;
  s.chat_template = chat.kind;
  if (chat.chat) {
    s.chat_template_text = chat.chat->text;
    s.chat_template_origin = chat.chat->origin;
    s.end_of_turn = chat.chat->end_of_turn;
  }
  if (out.examples.empty()) {
    throw InputError(s.source + ": no usable example in " + std::to_string(s.lines) +
                     " lines (" + std::to_string(s.blank_lines) + " blank, " +
                     std::to_string(s.skipped_total()) +
                     " skipped as bad); give a JSONL file with one example per line");
  }
  return out;
}

Dataset load_jsonl(const std::string& path, const LoadOptions& options, const Tokenizer& tokenizer) {
  if (const std::string why = why_not_a_file(path); !why.empty()) {
    std::string hint;
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) {
      std::vector<std::string> jsonl;
      for (const auto& e : std::filesystem::directory_iterator(path, ec))
        if (e.path().extension() == ".jsonl" && e.is_regular_file(ec)) jsonl.push_back(e.path().string());
      std::sort(jsonl.begin(), jsonl.end());
      hint = jsonl.empty() ? " (it holds no .jsonl file)" : " (it holds " + join(jsonl) + ")";
    }
    throw InputError(path + ": " + why + hint + "; data.path / data.eval_path must name a JSONL file, one "
                     "example per line");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw InputError(path + ": cannot open the data file (check its permissions); data.path / data.eval_path "
                     "must name a readable JSONL file");
  }
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) throw InputError(path + ": read error");
  return load_jsonl_text(buf.str(), path, options, tokenizer);
}

// ---------------------------------------------------------------- eval split

namespace {

void resummarize(Dataset& d) {
  DataSummary& s = d.summary;
  s.examples = static_cast<int64_t>(d.examples.size());
  s.tokens = s.trained_tokens = s.longest = s.truncated = s.segment_wise = 0;
  for (const TokenizedExample& ex : d.examples) {
    s.tokens += ex.size();
    s.trained_tokens += count_trained(ex);
    s.longest = std::max(s.longest, ex.size());
    s.truncated += ex.truncated;
    s.segment_wise += ex.segment_wise;
  }
}

}  // namespace

TrainEval split_eval(Dataset all, double eval_ratio, uint64_t seed) {
  TrainEval out;
  const int64_t n = static_cast<int64_t>(all.examples.size());
  if (!(eval_ratio > 0.0)) {
    out.train = std::move(all);
    return out;
  }
  if (eval_ratio >= 1.0) {
    throw InputError("data.eval_ratio must be below 1, got " + format_double(eval_ratio));
  }
  const int64_t n_eval = std::max<int64_t>(1, std::llround(eval_ratio * static_cast<double>(n)));
  if (n_eval >= n) {
    throw InputError("data.eval_ratio = " + format_double(eval_ratio) + " of " + std::to_string(n) +
                     " examples leaves no training example; lower data.eval_ratio or give "
                     "data.eval_path");
  }
  const std::vector<int64_t> perm = seeded_permutation(n, seed, kEvalSplitStream);
  std::vector<char> is_eval(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n_eval; ++i) is_eval[static_cast<size_t>(perm[static_cast<size_t>(i)])] = 1;
  out.train.summary = all.summary;
  out.eval.summary = all.summary;
  out.train.summary.source += " (train part)";
  out.eval.summary.source += " (eval part, ratio " + format_double(eval_ratio) + ")";
  for (int64_t i = 0; i < n; ++i) {
    (is_eval[static_cast<size_t>(i)] ? out.eval : out.train)
        .examples.push_back(std::move(all.examples[static_cast<size_t>(i)]));
  }
  resummarize(out.train);
  resummarize(out.eval);
  return out;
}

TrainEval load_train_eval(const DataConfig& cfg, uint64_t seed, const Tokenizer& tokenizer) {
  if (cfg.path.empty()) throw InputError("data.path: no training file given; set data.path");
  if (!cfg.eval_path.empty() && cfg.eval_ratio > 0.0) {
    throw InputError("data.eval_path and data.eval_ratio are both set; use one of them");
  }
  LoadOptions options = LoadOptions::from(cfg);
  Dataset train = load_jsonl(cfg.path, options, tokenizer);
  if (cfg.eval_path.empty()) return split_eval(std::move(train), cfg.eval_ratio, seed);
  // The eval file must be read the way training reads: same format and template.
  options.format = train.summary.format;
  options.chat_template = train.summary.chat_template == ChatTemplate::kAuto
                              ? cfg.chat_template
                              : train.summary.chat_template;
  TrainEval out;
  out.eval = load_jsonl(cfg.eval_path, options, tokenizer);
  out.train = std::move(train);
  return out;
}

}  // namespace qlora::data
