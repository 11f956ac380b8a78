// train/serving_files: what an adapter directory carries besides the adapter, so that the tuned
// model is served the way it was trained: the tokenizer's files, the chat template the chat data
// was rendered with (chat_template.jinja), and a generation_config.json whose eos_token_id also
// holds the template's end-of-turn token (a base model tuned on chats then stops after a reply in
// transformers' generate and vLLM); after alpaca data, a template that gives the Alpaca prompt
// (data/format.h). `qlora merge` prefers these files to the base model's.
#pragma once

#include <string>

#include "qlora/data/dataset.h"
#include "qlora/data/tokenizer.h"

namespace qlora::train {

// Writes the files into `adapter_dir` (which exists). The tokenizer's files come from the
// directory of `tokenizer.path()`; `summary` says whether the data was chat and with which
// template. Returns one line for the log ("" when nothing was written); a warning is logged
// when the end-of-turn text is not a single token (generation cannot stop on it).
std::string write_serving_files(const std::string& adapter_dir, const data::DataSummary& summary,
                                const data::Tokenizer& tokenizer);

}  // namespace qlora::train
