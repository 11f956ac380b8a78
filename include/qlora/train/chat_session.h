// train/chat_session: a tuned model ready to answer, for `qlora generate` and `qlora chat`: the
// base loaded as training loads it (NF4 projections on the device, or a merged directory), the
// PEFT adapter attached unmerged, the tokenizer, the chat template it was trained with (the
// adapter directory's chat_template.jinja before the model's), and the tokens that end a reply
// (eos, the template's end-of-turn, generation_config.json's eos_token_id list).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/data/chat_template.h"
#include "qlora/data/tokenizer.h"
#include "qlora/lora/lora.h"
#include "qlora/train/generate.h"
#include "qlora/train/setup.h"

namespace qlora::train {

struct ChatSession {
  BaseModel base;
  lora::LoraAdapter adapter;               // empty without one
  std::unique_ptr<data::Tokenizer> tokenizer;
  std::shared_ptr<const data::ModelChat> chat;  // nullptr when neither directory has a template
  std::vector<int32_t> stop_ids;
  std::string description;                 // "llama, 16 layers ... on CPU (fp32), adapter r 16"
  bool fold_system = false;                // a leading system message joins the first user turn
                                           // (data/chat_template.h: fold_system_prompt)

  // Messages [{"role", "content"}, ...] rendered with the generation prompt, as ids (the
  // template writes bos where the model wants it). InputError without a template, or where the
  // template refuses the conversation (its own message; for a system message it has no place for,
  // also the --fold-system that would fold it).
  std::vector<int32_t> chat_prompt(const nlohmann::ordered_json& messages) const;
  // Plain text as a prompt: bos first when the tokenizer adds one.
  std::vector<int32_t> text_prompt(const std::string& text) const;
};

// model_dir: a Hugging Face model directory; adapter_dir: "" or a PEFT adapter for it; device:
// auto, cpu or cuda. Throws InputError naming the file for a missing or mismatched model,
// adapter or tokenizer.
ChatSession open_chat_session(const std::string& model_dir, const std::string& adapter_dir, const std::string& device);

// Throws InputError when prompt + max_new_tokens exceed the model's max_position_embeddings
// (`what` names the prompt in the message).
void check_context(const ChatSession& s, const std::vector<int32_t>& prompt, int64_t max_new_tokens,
                   const std::string& what);

}  // namespace qlora::train
