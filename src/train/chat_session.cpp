#include "qlora/train/chat_session.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "qlora/common/errors.h"
#include "qlora/common/json_file.h"
#include "qlora/lora/adapter_io.h"
#include "qlora/train/vocab_check.h"

namespace qlora::train {
namespace {

namespace fs = std::filesystem;

void add_stop(std::vector<int32_t>& ids, int64_t id) {
  if (id >= 0 && std::find(ids.begin(), ids.end(), static_cast<int32_t>(id)) == ids.end())
    ids.push_back(static_cast<int32_t>(id));
}

// generation_config.json's eos_token_id (one id or a list), from the first directory that has one.
void add_generation_config_stops(std::vector<int32_t>& ids, const std::vector<std::string>& dirs) {
  for (const std::string& dir : dirs) {
    const fs::path p = fs::path(dir) / "generation_config.json";
    std::error_code ec;
    if (dir.empty() || !fs::exists(p, ec)) continue;
    const nlohmann::json gen = read_json_object(p.string(), "cannot read the generation config",
                                                "a Hugging Face generation_config.json");
    const auto it = gen.find("eos_token_id");
    if (it == gen.end() || it->is_null()) continue;
    for (const auto& e : it->is_array() ? *it : nlohmann::json::array({*it}))
      if (e.is_number_integer()) add_stop(ids, e.get<int64_t>());
    return;
  }
}

}  // namespace

ChatSession open_chat_session(const std::string& model_dir, const std::string& adapter_dir, const std::string& device) {
  Config cfg = default_config();
  cfg.model.path = model_dir;
  const DeviceChoice dev = choose_device(cfg, device);
  std::unique_ptr<data::Tokenizer> tokenizer = load_checked_tokenizer(model_dir);
  ChatSession s{load_base_model(cfg, dev), lora::LoraAdapter(), std::move(tokenizer), nullptr, {}, ""};
  s.description = s.base.shape.model_type + ", " + std::to_string(s.base.shape.num_hidden_layers) +
                  " layers, NF4 on " + dev.description + " (" + std::string(to_string(dev.precision)) + ")";
  if (!adapter_dir.empty()) {
    s.adapter = lora::load_adapter(s.base.model, adapter_dir);
    s.adapter.set_training(false);
    s.description += ", adapter " + adapter_dir + " (r " + std::to_string(s.adapter.settings().r) + ", " +
                     std::to_string(s.adapter.module_names().size()) + " modules)";
  }
  // The template the model was tuned with (written beside the adapter), else the model's own.
  for (const std::string& dir : {adapter_dir, model_dir}) {
    if (dir.empty() || s.chat) continue;
    s.chat = data::load_model_chat(dir);
  }
  add_stop(s.stop_ids, s.tokenizer->eos_id());
  if (s.chat && !s.chat->end_of_turn.empty())
    if (const auto id = s.tokenizer->token_id(s.chat->end_of_turn)) add_stop(s.stop_ids, *id);
  add_generation_config_stops(s.stop_ids, {adapter_dir, model_dir});
  return s;
}

std::vector<int32_t> ChatSession::chat_prompt(const nlohmann::ordered_json& messages) const {
  if (!chat)
    throw InputError("the model has no chat template (chat_template.jinja or tokenizer_config.json's "
                     "\"chat_template\", in the adapter or model directory); give plain-text prompts "
                     "({\"prompt\": ...}) or add the template");
  const auto render = [&](const nlohmann::ordered_json& m) {
    return chat->tmpl.render(m, /*add_generation_prompt=*/true, chat->variables);
  };
  if (fold_system) return tokenizer->encode(render(data::fold_system_prompt(messages)));
  try {
    return tokenizer->encode(render(messages));
  } catch (const InputError& e) {
    if (!data::starts_with_system(messages)) throw;
    try {
      render(data::fold_system_prompt(messages));
    } catch (const InputError&) {
      throw e;
    }
    throw InputError(std::string(e.what()) + "; the model's chat template has no place for a system message: "
                     "start with --fold-system to fold it into the first user turn");
  }
}

std::vector<int32_t> ChatSession::text_prompt(const std::string& text) const {
  std::vector<int32_t> ids = tokenizer->encode(text);
  if (tokenizer->add_bos() && tokenizer->bos_id() >= 0 && (ids.empty() || ids[0] != tokenizer->bos_id()))
    ids.insert(ids.begin(), tokenizer->bos_id());
  return ids;
}

void check_context(const ChatSession& s, const std::vector<int32_t>& prompt, int64_t max_new_tokens,
                   const std::string& what) {
  const int64_t max = s.base.shape.max_position_embeddings;
  const auto n = static_cast<int64_t>(prompt.size());
  if (n == 0) throw InputError(what + ": the prompt is empty");
  if (max > 0 && n + max_new_tokens > max)
    throw InputError(what + ": " + std::to_string(n) + " prompt tokens + " + std::to_string(max_new_tokens) +
                     " new ones exceed the model's context of " + std::to_string(max) +
                     " (max_position_embeddings); shorten the prompt or lower --max-new-tokens");
}

}  // namespace qlora::train
