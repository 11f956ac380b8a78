// The typed reader of one config.json object that model/family.cpp reads key by key: every
// failure names the file and the key, every key looked at is remembered so that what is left
// over can be reported. Private to the model module.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "qlora/common/errors.h"

namespace qlora::family_detail {

using json = nlohmann::json;

// Keys that do not change what training computes: bookkeeping, initialization of weights the
// checkpoint already holds, generation settings older transformers versions saved in config.json.
inline const std::set<std::string> kHarmlessKeys = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "use_cache", "initializer_range",
    "torch_dtype", "dtype", "pretraining_tp", "is_llama_config", "transformers.js_config", "tokenizer_class",
    "auto_map", "output_attentions", "output_hidden_states", "return_dict", "torchscript", "id2label",
    "label2id", "problem_type", "is_decoder", "is_encoder_decoder", "add_cross_attention", "tie_encoder_decoder",
    "chunk_size_feed_forward", "pruned_heads", "finetuning_task", "prefix", "task_specific_params",
    "sep_token_id", "decoder_start_token_id", "cross_attention_hidden_size", "tf_legacy_loss", "use_bfloat16",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "_attn_implementation_autoset", "_attn_implementation", "num_labels", "embd_pdrop", "resid_pdrop",
    "bos_token", "eos_token", "unk_token", "pad_token", "use_return_dict", "model_name"};

// ---------------------------------------------------------------- typed reading

// Reads typed keys of one config.json object; every failure names the file and key. Every key
// looked at is remembered, so what is left over can be reported.
class Reader {
 public:
  // `key_prefix`: how messages name this object's keys ("text_config." for a nested config).
  Reader(std::string path, const json& root, std::string key_prefix = "")
      : path_(std::move(path)), root_(root), prefix_(std::move(key_prefix)) {}
  const std::string& path() const { return path_; }
  const std::string& key_prefix() const { return prefix_; }

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw InputError(path_ + ": key \"" + prefix_ + key + "\": " + what);
  }

  static std::string describe(const json& v) {
    std::string text = v.dump();
    if (text.size() > 40) text = text.substr(0, 37) + "...";
    return std::string(v.type_name()) + " " + text;
  }

  // nullptr when absent or null. Top-level keys count as read.
  const json* find(const json& obj, const std::string& key) const {
    if (&obj == &root_) read_.insert(key);
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return nullptr;
    return &*it;
  }
  bool present(const std::string& key) const {
    read_.insert(key);
    return root_.contains(key);
  }

  int64_t positive_int(const json& v, const std::string& key) const {
    if (!v.is_number_integer()) fail(key, "expected a positive integer, got " + describe(v));
    int64_t n = v.get<int64_t>();
    if (n <= 0) fail(key, "expected a positive integer, got " + std::to_string(n));
    return n;
  }
  int64_t required_int(const std::string& key) const {
    const json* v = find(root_, key);
    if (!v) fail(key, "missing; it is required (a positive integer)");
    return positive_int(*v, key);
  }
  int64_t optional_int(const std::string& key, int64_t fallback) const {
    const json* v = find(root_, key);
    return v ? positive_int(*v, key) : fallback;
  }
  double number(const json& obj, const std::string& key, const std::string& shown_key, double fallback,
                bool required) const {
    const json* v = find(obj, key);
    if (!v) {
      if (required) fail(shown_key, "missing; it is required (a number)");
      return fallback;
    }
    if (!v->is_number()) fail(shown_key, "expected a number, got " + describe(*v));
    return v->get<double>();
  }
  bool boolean(const json& obj, const std::string& key, const std::string& shown_key, bool fallback) const {
    const json* v = find(obj, key);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(shown_key, "expected true or false, got " + describe(*v));
    return v->get<bool>();
  }
  bool optional_bool(const std::string& key, bool fallback) const { return boolean(root_, key, key, fallback); }
  std::string string(const json& obj, const std::string& key, const std::string& shown_key) const {
    const json* v = find(obj, key);
    if (!v) return "";
    if (!v->is_string()) fail(shown_key, "expected a string, got " + describe(*v));
    return v->get<std::string>();
  }

  // A token id key (bos_token_id, ...): an integer naming a row of the embedding; `list_ok`:
  // a list of them is accepted too (eos_token_id). Empty when absent or null; pad_token_id -1
  // is "none", as old conversions wrote it.
  std::vector<int64_t> token_ids(const std::string& key, int64_t vocab_size, bool list_ok) const {
    const json* v = find(root_, key);
    if (!v) return {};
    if (key == "pad_token_id" && v->is_number_integer() && v->get<int64_t>() == -1) return {};
    const bool list = v->is_array() && list_ok && !v->empty();
    std::vector<int64_t> ids;
    for (const json& e : list ? *v : json::array({*v})) {
      if (!e.is_number_integer())
        fail(key, std::string("expected a token id (an integer") + (list_ok ? ", or a list of them" : "") +
                      "), got " + describe(*v));
      const int64_t id = e.get<int64_t>();
      if (id < 0 || id >= vocab_size)
        fail(key, std::to_string(id) + " is not a token of the model: its embedding has vocab_size " +
                      std::to_string(vocab_size) + " rows (ids 0.." + std::to_string(vocab_size - 1) +
                      "). Fix " + key + ", or use the config.json that came with these weights");
      ids.push_back(id);
    }
    return ids;
  }

  const json& root() const { return root_; }

  // Top-level keys neither read nor known to be harmless, in file order.
  std::vector<std::string> unread() const {
    std::vector<std::string> out;
    for (const auto& [key, value] : root_.items())
      if (!read_.count(key) && !kHarmlessKeys.count(key)) out.push_back(prefix_ + key);
    return out;
  }

 private:
  std::string path_;
  const json& root_;
  std::string prefix_;
  mutable std::set<std::string> read_;
};

}  // namespace qlora::family_detail
