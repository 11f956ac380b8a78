// PLACEHOLDER (see include/qlora/model/llama_config.h).
#include "qlora/model/llama_config.h"
namespace qlora {
const std::vector<std::string>& model_preset_names() {
  static const std::vector<std::string> names = {"llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b",
                                                 "llama-2-7b",   "mistral-7b",   "llama-3.1-70b"};
  return names;
}
}  // namespace qlora
