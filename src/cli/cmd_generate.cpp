// qlora generate / qlora chat: try the tuned model.
//
//   qlora generate --model DIR [--adapter DIR] --prompts FILE.jsonl --out FILE.jsonl [sampling options]
//   qlora chat --model DIR [--adapter DIR] [sampling options]
//
// The model is loaded as training loads it (NF4 base, the adapter unmerged; a merged directory
// works as a model), prompts are rendered with the chat template the adapter was trained with,
// and decoding is train::generate (KV cache). A prompt line is {"prompt": "text"} (plain text) or
// {"messages": [...]} (a chat, rendered with the generation prompt).
#include <unistd.h>

#include <fstream>
#include <iostream>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "qlora/common/errors.h"
#include "qlora/common/input_files.h"
#include "qlora/train/chat_session.h"

namespace qlora::cli {
namespace {

using ojson = nlohmann::ordered_json;

struct ModelFlags {
  std::string model, adapter, device = "auto";
  train::SamplingOptions sampling;
  std::vector<std::string> stop;
  bool fold_system = false;
};

void add_model_flags(CLI::App& cmd, ModelFlags& f) {
  cmd.add_option("--model", f.model, "the base model directory (or a merged one)")->required();
  cmd.add_option("--adapter", f.adapter, "a PEFT LoRA adapter directory for it (qlora train's output/adapter)");
  cmd.add_option("--device", f.device, "auto (a GPU when there is one), cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd.add_option("--max-new-tokens", f.sampling.max_new_tokens, "tokens to generate at most per answer")
      ->check(CLI::PositiveNumber);
  cmd.add_option("--temperature", f.sampling.temperature, "0: greedy (the default); above 0: sampling")
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--top-k", f.sampling.top_k, "sampling: keep the k most likely tokens (0: off)")
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--top-p", f.sampling.top_p, "sampling: keep the most likely tokens up to this probability")
      ->check(CLI::Range(0.0, 1.0));
  cmd.add_option("--min-p", f.sampling.min_p, "sampling: drop tokens below min-p times the best's probability")
      ->check(CLI::Range(0.0, 1.0));
  cmd.add_option("--repetition-penalty", f.sampling.repetition_penalty,
                 "> 1 discourages tokens already in the prompt or the answer")
      ->check(CLI::PositiveNumber);
  cmd.add_option("--seed", f.sampling.seed, "sampling seed (the same seed, the same answers)");
  cmd.add_option("--stop", f.stop, "stop an answer at this text too (repeatable)");
  cmd.add_flag("--fold-system", f.fold_system,
               "fold a system message into the first user turn (\"SYSTEM\\n\\nUSER\"), for chat templates with no "
               "place for one (Gemma's), as data.fold_system_prompt does in training");
}

train::ChatSession open(ModelFlags& f) {
  train::ChatSession s = train::open_chat_session(f.model, f.adapter, f.device);
  s.fold_system = f.fold_system;
  f.sampling.stop_ids = s.stop_ids;
  return s;
}

// Stops a row once its decoded text holds a stop string.
train::StopWhen stop_strings(const train::ChatSession& s, const std::vector<std::string>& stop) {
  if (stop.empty()) return {};
  return [&s, stop](size_t, const std::vector<int32_t>& ids) {
    const std::string text = s.tokenizer->decode(ids);
    for (const std::string& x : stop)
      if (text.find(x) != std::string::npos) return true;
    return false;
  };
}

std::string cut_at_stop(std::string text, const std::vector<std::string>& stop) {
  for (const std::string& x : stop)
    if (const size_t at = text.find(x); at != std::string::npos) text.resize(at);
  return text;
}

}  // namespace

Runner add_generate_command(CLI::App& root) {
  auto f = std::make_shared<ModelFlags>();
  auto prompts = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto batch = std::make_shared<int64_t>(8);
  CLI::App* cmd = root.add_subcommand(
      "generate", "answer a JSONL file of prompts ({\"prompt\": text} or {\"messages\": chat}) with the tuned model");
  add_model_flags(*cmd, *f);
  cmd->add_option("--prompts", *prompts, "JSONL, one prompt a line")->required();
  cmd->add_option("--out", *out, "JSONL written here: line, prompt, completion, tokens, stopped")->required();
  cmd->add_option("--batch-size", *batch, "prompts decoded together")->check(CLI::PositiveNumber);
  return [f, prompts, out, batch]() {
    if (const std::string why = why_not_a_file(*prompts); !why.empty())
      throw InputError(*prompts + ": " + why + "; --prompts must name a JSONL file of prompts");
    std::ifstream in(*prompts, std::ios::binary);
    struct Item {
      int64_t line;
      ojson prompt;
      std::vector<int32_t> ids;
    };
    std::vector<ojson> raw;
    std::vector<int64_t> lines;
    std::string text;
    for (int64_t n = 1; std::getline(in, text); ++n) {
      if (!text.empty() && text.back() == '\r') text.pop_back();
      if (text.find_first_not_of(" \t") == std::string::npos) continue;
      ojson j;
      try {
        j = ojson::parse(text);
      } catch (const ojson::parse_error& e) {
        throw InputError(*prompts + ":" + std::to_string(n) + ": not JSON (" + e.what() +
                         "); each line is {\"prompt\": \"...\"} or {\"messages\": [...]}");
      }
      const bool chat = j.is_object() && j.contains("messages") && j["messages"].is_array();
      const bool plain = j.is_object() && j.contains("prompt") && j["prompt"].is_string();
      if (!chat && !plain)
        throw InputError(*prompts + ":" + std::to_string(n) + ": expected {\"prompt\": \"...\"} or {\"messages\": "
                         "[{\"role\", \"content\"}, ...]}");
      raw.push_back(j);
      lines.push_back(n);
    }
    if (raw.empty()) throw InputError(*prompts + ": no prompt in the file");
    train::ChatSession s = open(*f);
    std::cerr << "model      " << s.description << "\n";
    std::vector<Item> items;
    for (size_t i = 0; i < raw.size(); ++i) {
      const std::string where = *prompts + ":" + std::to_string(lines[i]);
      std::vector<int32_t> ids;
      try {
        ids = raw[i].contains("messages") ? s.chat_prompt(raw[i]["messages"]) : s.text_prompt(raw[i]["prompt"]);
      } catch (const InputError& e) {
        throw InputError(where + ": " + e.what());
      }
      train::check_context(s, ids, f->sampling.max_new_tokens, where);
      items.push_back({lines[i], raw[i].contains("messages") ? raw[i]["messages"] : raw[i]["prompt"], std::move(ids)});
    }
    std::ofstream o(*out, std::ios::binary | std::ios::trunc);
    if (!o) throw InputError(*out + ": cannot write the output file");
    const train::StopWhen stop = stop_strings(s, f->stop);
    for (size_t at = 0; at < items.size(); at += static_cast<size_t>(*batch)) {
      std::vector<std::vector<int32_t>> ids;
      for (size_t i = at; i < items.size() && i < at + static_cast<size_t>(*batch); ++i) ids.push_back(items[i].ids);
      const auto answers = train::generate(s.base.model, ids, f->sampling, {}, stop);
      for (size_t k = 0; k < answers.size(); ++k) {
        const Item& it = items[at + k];
        const bool length = static_cast<int64_t>(answers[k].size()) >= f->sampling.max_new_tokens;
        o << ojson{{"line", it.line},
                   {"prompt", it.prompt},
                   {"completion", cut_at_stop(s.tokenizer->decode(answers[k]), f->stop)},
                   {"tokens", answers[k].size()},
                   {"stopped", length ? "length" : "stop"}}
                 .dump()
          << "\n";
      }
      std::cerr << "generated  " << std::min(items.size(), at + static_cast<size_t>(*batch)) << " of " << items.size()
                << "\n";
    }
    if (!o.flush()) throw InputError(*out + ": write failed (disk full?)");
    std::cout << "wrote " << items.size() << " answers to " << *out << "\n";
    return kExitOk;
  };
}

Runner add_chat_command(CLI::App& root) {
  auto f = std::make_shared<ModelFlags>();
  CLI::App* cmd = root.add_subcommand(
      "chat", "talk to the tuned model in the terminal, with its chat template (/reset, /system TEXT, /exit)");
  add_model_flags(*cmd, *f);
  return [f]() {
    train::ChatSession s = open(*f);
    if (!s.chat)
      throw InputError(f->model + ": no chat template (chat_template.jinja or tokenizer_config.json's "
                       "\"chat_template\", in the adapter or model directory); use qlora generate with plain prompts");
    const bool tty = isatty(STDIN_FILENO) != 0;
    std::cerr << "model      " << s.description << "\n"
              << "chat       " << s.chat->origin << "; /reset forgets, /system TEXT sets the system prompt, /exit\n";
    ojson messages = ojson::array();
    std::string system, line;
    while (true) {
      if (tty) std::cout << "> " << std::flush;
      if (!std::getline(std::cin, line)) break;
      if (line == "/exit" || line == "/quit") break;
      if (line == "/reset") {
        messages = ojson::array();
        std::cout << "(history cleared)\n";
        continue;
      }
      if (line.rfind("/system", 0) == 0) {
        system = line.size() > 8 ? line.substr(8) : "";
        messages = ojson::array();
        std::cout << (system.empty() ? "(no system prompt; history cleared)\n" : "(system prompt set; history cleared)\n");
        continue;
      }
      if (line.empty()) continue;
      ojson turn = messages;
      if (!system.empty() && turn.empty()) turn.push_back({{"role", "system"}, {"content", system}});
      turn.push_back({{"role", "user"}, {"content", line}});
      std::vector<int32_t> ids;
      try {
        ids = s.chat_prompt(turn);
        train::check_context(s, ids, f->sampling.max_new_tokens, "the conversation");
      } catch (const InputError& e) {
        std::cout << "(" << e.what() << "; /reset to start over)\n";
        continue;
      }
      // Stream: print what each new token adds to the decoded answer.
      std::vector<int32_t> answer;
      std::string shown;
      const auto on_token = [&](size_t, int32_t tok) {
        answer.push_back(tok);
        const std::string text = cut_at_stop(s.tokenizer->decode(answer), f->stop);
        if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) {
          std::cout << text.substr(shown.size()) << std::flush;
          shown = text;
        }
      };
      train::generate(s.base.model, {ids}, f->sampling, on_token, stop_strings(s, f->stop));
      std::cout << "\n";
      if (turn.size() == messages.size() + 2) messages = turn;  // with the system message
      else messages.push_back(turn.back());
      messages.push_back({{"role", "assistant"}, {"content", cut_at_stop(s.tokenizer->decode(answer), f->stop)}});
    }
    return kExitOk;
  };
}

}  // namespace qlora::cli
