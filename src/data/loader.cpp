#include "qlora/data/loader.h"

#include <nlohmann/json.hpp>

#include "qlora/common/errors.h"
#include "qlora/data/shuffle.h"

namespace qlora::data {

using nlohmann::json;

uint64_t data_fingerprint(const std::vector<TokenizedExample>& examples) {
  uint64_t h = 0xcbf29ce484222325ULL;
  auto feed = [&h](uint64_t v) {
    for (int b = 0; b < 8; ++b) {
      h ^= (v >> (8 * b)) & 0xff;
      h *= 0x100000001b3ULL;
    }
  };
  feed(examples.size());
  for (const TokenizedExample& ex : examples) {
    feed(static_cast<uint64_t>(ex.size()));
    for (size_t i = 0; i < ex.input_ids.size(); ++i) {
      feed(static_cast<uint32_t>(ex.input_ids[i]));
      feed(static_cast<uint32_t>(ex.labels[i]));
    }
  }
  return h;
}

// ---------------------------------------------------------------- cursor JSON

std::string LoaderCursor::to_json() const {
  json j;
  j["format_version"] = kFormatVersion;
  j["epoch"] = epoch;
  j["position"] = position;
  j["seed"] = seed;
  j["num_examples"] = num_examples;
  j["data_fingerprint"] = data_fingerprint;
  j["micro_batch_size"] = micro_batch_size;
  j["packing"] = packing;
  j["max_seq_length"] = max_seq_length;
  j["world_size"] = world_size;
  j["shuffle"] = shuffle;
  return j.dump();
}

LoaderCursor LoaderCursor::from_json(std::string_view text, std::string_view source) {
  const std::string where(source);
  json j;
  try {
    j = json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    throw InputError(where + ": the data loader cursor is not valid JSON (" + e.what() +
                     "); the checkpoint is damaged: resume from an older one");
  }
  if (!j.is_object()) throw InputError(where + ": the data loader cursor must be a JSON object");
  LoaderCursor c;
  try {
    const int version = j.at("format_version").get<int>();
    if (version != kFormatVersion) {
      throw InputError(where + ": data loader cursor format_version " + std::to_string(version) +
                       ", this build reads " + std::to_string(kFormatVersion) +
                       "; resume with the qlora version that wrote the checkpoint");
    }
    c.epoch = j.at("epoch").get<int64_t>();
    c.position = j.at("position").get<int64_t>();
    c.seed = j.at("seed").get<uint64_t>();
    c.num_examples = j.at("num_examples").get<int64_t>();
    c.data_fingerprint = j.at("data_fingerprint").get<uint64_t>();
    c.micro_batch_size = j.at("micro_batch_size").get<int64_t>();
    c.packing = j.at("packing").get<bool>();
    c.max_seq_length = j.at("max_seq_length").get<int64_t>();
    c.world_size = j.at("world_size").get<int64_t>();
    c.shuffle = j.at("shuffle").get<bool>();
  } catch (const json::exception& e) {
    throw InputError(where + ": data loader cursor: " + e.what() +
                     "; the checkpoint is damaged: resume from an older one");
  }
  if (c.epoch < 0 || c.position < 0) {
    throw InputError(where + ": data loader cursor has a negative epoch or position");
  }
  return c;
}

// ---------------------------------------------------------------- loader

DataLoader::DataLoader(const std::vector<TokenizedExample>& examples, LoaderOptions options)
    : examples_(examples), options_(options) {
  if (options_.micro_batch_size < 1) {
    throw InputError("train.micro_batch_size must be at least 1, got " +
                     std::to_string(options_.micro_batch_size));
  }
  if (options_.world_size < 1 || options_.rank < 0 || options_.rank >= options_.world_size) {
    throw InputError("data loader: rank " + std::to_string(options_.rank) +
                     " is outside world size " + std::to_string(options_.world_size) +
                     "; check RANK / WORLD_SIZE");
  }
  if (examples_.empty()) throw InputError("data loader: no examples");
  cursor_.seed = options_.seed;
  cursor_.num_examples = static_cast<int64_t>(examples_.size());
  cursor_.data_fingerprint = data_fingerprint(examples_);
  cursor_.micro_batch_size = options_.micro_batch_size;
  cursor_.packing = options_.packing;
  cursor_.max_seq_length = options_.max_seq_length;
  cursor_.world_size = options_.world_size;
  cursor_.shuffle = options_.shuffle;
  if (steps_in_epoch(0) == 0) {
    throw InputError("data: " + std::to_string(examples_.size()) + " examples make fewer micro "
                     "batches than the " + std::to_string(options_.world_size) +
                     " ranks; use more data, a smaller train.micro_batch_size or fewer ranks");
  }
}

std::vector<std::vector<int64_t>> DataLoader::epoch_micro_batches(int64_t epoch) const {
  const Plan plan = make_plan(epoch);
  std::vector<std::vector<int64_t>> out;
  for (const auto& mb : plan.batches) {
    out.emplace_back();
    for (const auto& row : mb) out.back().insert(out.back().end(), row.begin(), row.end());
  }
  return out;
}

DataLoader::Plan DataLoader::make_plan(int64_t epoch) const {
  const int64_t n = static_cast<int64_t>(examples_.size());
  std::vector<int64_t> order;
  if (options_.shuffle) {
    order = seeded_permutation(n, options_.seed, kEpochStreamBase + static_cast<uint64_t>(epoch));
  } else {
    order.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  }
  std::vector<std::vector<int64_t>> rows;
  if (options_.packing) {
    rows = pack_next_fit(examples_, order, options_.max_seq_length);
  } else {
    for (int64_t i : order) rows.push_back({i});
  }
  Plan plan;
  plan.epoch = epoch;
  const size_t mbs = static_cast<size_t>(options_.micro_batch_size);
  for (size_t r = 0; r < rows.size(); r += mbs) {
    const size_t end = std::min(rows.size(), r + mbs);
    plan.batches.emplace_back(rows.begin() + static_cast<std::ptrdiff_t>(r),
                              rows.begin() + static_cast<std::ptrdiff_t>(end));
  }
  return plan;
}

int64_t DataLoader::steps_of(const Plan& plan) const {
  const int64_t m = static_cast<int64_t>(plan.batches.size());
  const int64_t w = options_.world_size;
  if (options_.even_shards) return m / w;
  return m > options_.rank ? (m - options_.rank + w - 1) / w : 0;
}

int64_t DataLoader::steps_in_epoch(int64_t epoch) const {
  if (epoch == plan_.epoch) return steps_of(plan_);
  return steps_of(make_plan(epoch));
}

const DataLoader::Plan& DataLoader::plan_for(int64_t epoch) {
  if (plan_.epoch != epoch) plan_ = make_plan(epoch);
  return plan_;
}

Batch DataLoader::next() {
  while (cursor_.position >= steps_of(plan_for(cursor_.epoch))) {
    ++cursor_.epoch;
    cursor_.position = 0;
  }
  const Plan& plan = plan_;
  const size_t k = static_cast<size_t>(cursor_.position * options_.world_size + options_.rank);
  ++cursor_.position;
  const auto& rows = plan.batches[k];
  if (options_.packing) return collate_packed(examples_, rows, options_.pad_id);
  std::vector<int64_t> indices;
  for (const auto& row : rows) indices.push_back(row.front());
  return collate_padded(examples_, indices, options_.pad_id);
}

void DataLoader::restore(const LoaderCursor& c) {
  auto mismatch = [](const std::string& what, const std::string& saved, const std::string& now) {
    return InputError("cannot resume the data loader: " + what + " was " + saved +
                      " when the checkpoint was written and is " + now +
                      " now; resume with the same data and batch settings, or start a new run");
  };
  const LoaderCursor& me = cursor_;
  if (c.seed != me.seed) throw mismatch("train.seed", std::to_string(c.seed), std::to_string(me.seed));
  if (c.num_examples != me.num_examples || c.data_fingerprint != me.data_fingerprint) {
    throw mismatch("the tokenized training data (" + std::to_string(c.num_examples) +
                       " examples)",
                   "different", std::to_string(me.num_examples) + " examples");
  }
  if (c.micro_batch_size != me.micro_batch_size) {
    throw mismatch("train.micro_batch_size", std::to_string(c.micro_batch_size),
                   std::to_string(me.micro_batch_size));
  }
  if (c.packing != me.packing) {
    throw mismatch("data.packing", c.packing ? "true" : "false", me.packing ? "true" : "false");
  }
  if (c.packing && c.max_seq_length != me.max_seq_length) {
    throw mismatch("data.max_seq_length", std::to_string(c.max_seq_length),
                   std::to_string(me.max_seq_length));
  }
  if (c.shuffle != me.shuffle) {
    throw mismatch("shuffling", c.shuffle ? "on" : "off", me.shuffle ? "on" : "off");
  }
  // Note [sharding]: the ranks of a step take consecutive micro batches of
  // M_e, so the epoch's progress is position × world_size global micro
  // batches whatever the world size; another world size continues from the
  // same global micro batch when it divides that count.
  int64_t position = c.position;
  if (c.world_size != me.world_size) {
    const int64_t global = c.position * c.world_size;
    if (c.world_size < 1 || global % me.world_size != 0) {
      throw InputError("cannot resume the data loader on " + std::to_string(me.world_size) +
                       " processes: the checkpoint was written by " + std::to_string(c.world_size) + " after " +
                       std::to_string(global) + " micro batches of epoch " + std::to_string(c.epoch) + ", which " +
                       std::to_string(me.world_size) + " ranks cannot split evenly; resume on " +
                       std::to_string(c.world_size) + " processes (or a world size dividing " + std::to_string(global) +
                       ")");
    }
    position = global / me.world_size;
  }
  cursor_.epoch = c.epoch;
  cursor_.position = position;
}

}  // namespace qlora::data
