// What is wrong with a path a user gave as input, in words every loader's message shares:
// a directory where a file belongs, a file where a directory belongs, a GGUF file where a
// Hugging Face model is expected. Torch-free.
#pragma once

#include <string>

namespace qlora {

// Why `path` cannot be read as a file: "does not exist", "is a directory, not a file", "is not
// a regular file"; "" when it is a regular file (or a link to one).
std::string why_not_a_file(const std::string& path);

// True when `path` is a GGUF file (llama.cpp's format): a regular file named *.gguf or whose
// first four bytes are "GGUF".
bool is_gguf_file(const std::string& path);

// What to do with a GGUF model, for a message that found one where a Hugging Face model
// directory belongs.
inline constexpr char kGgufHint[] =
    "qlora reads Hugging Face model directories (config.json, *.safetensors, the tokenizer), not "
    "GGUF files; download the model's Hugging Face repository (huggingface-cli download "
    "<org>/<model> --local-dir DIR), or convert the GGUF back to safetensors, and set model.path "
    "to that directory";

}  // namespace qlora
