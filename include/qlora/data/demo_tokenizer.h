// data/demo_tokenizer: a small byte-level BPE tokenizer learned from a data
// set, written as a Hugging Face model directory's tokenizer files. `qlora
// demo` builds its tiny model's tokenizer this way, and tests and benchmarks
// use the merge-free form (256 byte tokens plus the special tokens).
//
// The tokenizer.json has the Qwen2 family's shape (GPT-2 byte map, one digit
// per pre-token, so numbers stay digit by digit) plus Llama 3's special tokens
// after the byte and merged tokens; transformers' tokenizers library reads it
// as it reads any BPE tokenizer.json.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace qlora::data {

// ---------------------------------------------------------------- learning
// The texts of a JSONL training file as the trainer renders them (any format
// the data module reads), for learning merges. Throws InputError naming the
// file and line of a line that does not parse.
std::vector<std::string> rendered_texts(const std::string& jsonl_path);

// Byte-level BPE merges learned from `texts`: at most `max_merges`, each the
// most frequent adjacent pair (ties: the smaller pair) over the pre-tokenized
// pieces, stopping when no pair occurs twice. Pairs as byte strings.
std::vector<std::pair<std::string, std::string>> learn_merges(const std::vector<std::string>& texts, int max_merges);

// ---------------------------------------------------------------- writing
// Llama 3's special tokens in the order write_demo_tokenizer numbers them
// (after the byte and merged tokens): <|begin_of_text|> (bos) first,
// <|end_of_text|> (eos) second.
const std::vector<std::string>& demo_special_tokens();

// tokenizer.json (256 byte tokens, then one per merge, then the special
// tokens), tokenizer_config.json and special_tokens_map.json in dir. Returns
// the vocabulary size.
int64_t write_demo_tokenizer(const std::string& dir,
                             const std::vector<std::pair<std::string, std::string>>& merges = {});

}  // namespace qlora::data
