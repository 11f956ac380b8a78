// train/vocab_check: the tokenizer and the base model agree on the vocabulary before a run
// starts. Every id the tokenizer can produce (vocabulary, added and special tokens) needs a row
// of the embedding; an id past the last row would end the first batch that holds it with an
// index error deep in LibTorch. A model may have more rows than the tokenizer has ids (padding
// rows, e.g. a vocab_size rounded up to a multiple of 64): that is fine. The token ids
// config.json names (bos/eos/pad) must be rows of the embedding (read_decoder_config checks that)
// and tokens of the tokenizer (checked here).
#pragma once

#include <memory>
#include <string>

#include "qlora/data/tokenizer.h"
#include "qlora/model/decoder_config.h"

namespace qlora::train {

// Throws InputError naming the tokenizer file, the token, its id and the model's vocab_size
// (from `config_path`, the model's config.json; "" for a preset) when they disagree.
void check_tokenizer_fits_model(const data::Tokenizer& tokenizer, const DecoderConfig& model,
                                const std::string& config_path);

// The tokenizer of a model directory (data::load_tokenizer), checked against the directory's
// config.json when it has one. InputError when there is no tokenizer file, or as above.
std::unique_ptr<data::Tokenizer> load_checked_tokenizer(const std::string& model_dir);

}  // namespace qlora::train
