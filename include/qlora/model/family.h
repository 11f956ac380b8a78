// model/family: the decoder families qlora trains, and config.json read key by key.
//
// A family is what transformers calls a model_type (llama, mistral, qwen2, qwen3): the
// architecture class it saves under, the defaults its config class applies, the config.json
// keys it reads and what each means for the layer (model/decoder_config.h: LayerPieces, the
// RoPE scaling, each layer's attention window). Reading a config.json goes through the family's
// row: every key is either read (and checked), known not to change training (initializer_range,
// use_cache, ...), or unknown, which is reported in one warning line; a key whose value asks for
// arithmetic qlora does not implement (another activation, attention dropout, a pre-quantized
// checkpoint, an unsupported RoPE type) is refused by name with the file. A new family is a row
// here plus, where its layer differs, a piece in the layer (src/model/decoder.cpp for the
// reference, src/layer/ for the fused GPU layer). Torch-free.
#pragma once

#include <string>
#include <vector>

#include "qlora/model/decoder_config.h"

namespace qlora {

struct Family {
  std::string model_type;    // config.json's model_type: "qwen2"
  std::string architecture;  // the class transformers saves it as: "Qwen2ForCausalLM"
  std::string models;        // what users know it as, for messages: "Qwen2, Qwen2.5"
};

// Every family this build trains, in the order messages list them.
const std::vector<Family>& families();

// The family of `model_type`; nullptr for one qlora does not train.
const Family* find_family(const std::string& model_type);

// "llama (Llama 2, Llama 3.x, SmolLM2, TinyLlama), mistral (...), ...": for messages.
std::string supported_families_text();

// Reads a Hugging Face config.json. Throws InputError naming the file and the key for: a
// missing or unreadable file, text that is not JSON, a missing or wrongly typed required key,
// a model_type qlora does not train (naming the ones it does), an architectures entry that is
// not the family's causal LM, an inconsistent shape (kv heads not dividing heads, an odd
// head_dim, ...), a value asking for arithmetic qlora does not implement (hidden_act other than
// silu, attention_dropout > 0, rope_type longrope, a quantization_config, ...), or a bos/eos/pad
// token id that is not a row of the embedding (0 <= id < vocab_size; pad_token_id -1 means none).
// Keys it does not know are listed in DecoderConfig::unread_keys and logged as one warning.
// A multimodal Gemma 3 config (model_type "gemma3", Gemma3ForConditionalGeneration) is read as
// its text part: text_config as a gemma3_text config with Gemma3TextConfig's defaults for the
// keys it leaves out, the image tower's keys ignored, module_prefix kGemma3TextPrefix.
DecoderConfig read_decoder_config(const std::string& config_json_path);

}  // namespace qlora
