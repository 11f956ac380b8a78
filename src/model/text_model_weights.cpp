// The text model's tensors in a multimodal checkpoint (model/decoder.h: text_model_weight_name,
// text_model_weights): Gemma3ForConditionalGeneration's two namings, its image tower skipped.
#include <map>
#include <memory>
#include <string>

#include "qlora/model/decoder.h"

namespace qlora::model {

std::string text_model_weight_name(const DecoderConfig& c, const std::string& name) {
  if (!c.multimodal()) return name;
  const auto starts = [&name](const std::string& p) { return name.compare(0, p.size(), p) == 0; };
  for (const char* tower : {"vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                            "model.multi_modal_projector."})
    if (starts(tower)) return "";
  // The published files' names, from the modules of transformers < 4.52 (a Gemma3ForCausalLM
  // inside): transformers renames them on load and back on save_pretrained.
  const std::string old_lm_head = "language_model.lm_head.", old_text = "language_model.model.";
  if (starts(old_lm_head)) return "lm_head." + name.substr(old_lm_head.size());
  if (starts(old_text)) return c.module_prefix + name.substr(old_text.size());
  return name;
}

WeightSource text_model_weights(const DecoderConfig& c, const WeightSource& src) {
  if (!c.multimodal()) return src;
  auto checkpoint_name = std::make_shared<std::map<std::string, std::string>>();
  WeightSource out;
  out.origin = src.origin;
  for (const std::string& n : src.names) {
    const std::string mine = text_model_weight_name(c, n);
    if (mine.empty()) continue;
    (*checkpoint_name)[mine] = n;
    out.names.push_back(mine);
  }
  const auto original = [checkpoint_name](const std::string& n) {
    const auto it = checkpoint_name->find(n);
    return it == checkpoint_name->end() ? n : it->second;
  };
  out.get = [get = src.get, original](const std::string& n) { return get(original(n)); };
  if (src.file_of) out.file_of = [file_of = src.file_of, original](const std::string& n) { return file_of(original(n)); };
  return out;
}

}  // namespace qlora::model
