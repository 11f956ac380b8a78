// `qlora train` on inputs broken one way at a time, through the real binary so the exit code is
// the one a user sees. One row per way a file can be wrong: the weights, config.json, the
// tokenizer, the data, the run config. Every row must end with exit 2 and one error line that
// names the file at fault and says what is wrong; never a stack trace, never a silent pass.
// The control rows train on the same scene unbroken (exit 0): each bad row fails for its own
// break, not for the scene.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "support/test_support.h"
#include "support/train_fixtures.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// Rows run as processes side by side: each a single CPU thread, most of them done before the
// first step.
constexpr int kParallelRuns = 4;

using testing::slurp;

void spit(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

json read_json(const std::string& path) { return json::parse(slurp(path)); }
void write_json(const std::string& path, const json& j) { spit(path, j.dump(1)); }

// A safetensors file taken apart: the header object and the data bytes after it.
struct Safetensors {
  json header;
  std::string data;
};

Safetensors read_safetensors(const std::string& path) {
  const std::string bytes = slurp(path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);  // little-endian, as this machine
  return {json::parse(bytes.substr(8, n)), bytes.substr(8 + n)};
}

void write_safetensors(const std::string& path, const Safetensors& st) {
  std::string header = st.header.dump();
  header.append((8 - header.size() % 8) % 8, ' ');
  const uint64_t n = header.size();
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &n, 8);
  spit(path, bytes + header + st.data);
}

// Writes `value` over element `index` of an fp32 tensor.
void poke_float(const std::string& path, const std::string& tensor, int64_t index, float value) {
  Safetensors st = read_safetensors(path);
  ASSERT_EQ(st.header.at(tensor).at("dtype"), "F32");
  const int64_t begin = st.header.at(tensor).at("data_offsets").at(0).get<int64_t>();
  std::memcpy(st.data.data() + begin + 4 * index, &value, 4);
  write_safetensors(path, st);
}

// One run directory: model/ (the small test model, copied), data.jsonl, run.yaml, out/.
struct Scene {
  std::string root;
  std::string extra;  // more arguments for the command line (--set ...)
  std::string at(const std::string& rel) const { return root + "/" + rel; }
  std::string weights() const { return at("model/model.safetensors"); }
  std::string config() const { return at("model/config.json"); }
  std::string tokenizer() const { return at("model/tokenizer.json"); }
  std::string data() const { return at("data.jsonl"); }
};

std::string completion_lines(int n) {
  std::string text;
  for (int i = 0; i < n; ++i)
    text += R"({"prompt": "add )" + std::to_string(i) + R"( and 2 =", "completion": " )" + std::to_string(i + 2) +
            "\"}\n";
  return text;
}

Scene make_scene(const std::string& tag) {
  Scene s{testing::make_temp_dir("bad-" + tag), ""};
  fs::copy(testing::small_model_dir(), s.at("model"), fs::copy_options::recursive);
  spit(s.data(), completion_lines(6));
  spit(s.at("run.yaml"), "model:\n  path: " + s.at("model") +
                             "\nlora:\n  r: 4\n  alpha: 8\n  target_modules: [q_proj, v_proj]\n"
                             "data:\n  path: " + s.data() + "\n  max_seq_length: 64\n"
                             "train:\n  micro_batch_size: 2\n  gradient_accumulation_steps: 1\n  max_steps: 1\n"
                             "  precision: fp32\n  optimizer: adamw\n  gradient_checkpointing: false\n"
                             "output:\n  dir: " + s.at("out") + "\n  save_steps: 1000\n  logging_steps: 1\n");
  return s;
}

void edit_json(const std::string& path, const std::function<void(json&)>& edit) {
  json j = read_json(path);
  edit(j);
  write_json(path, j);
}

void replace_by_directory(const std::string& path) {
  fs::remove(path);
  fs::create_directories(path + "/nested");
}

// The model directory rewritten with `extra_rows` embedding rows past the tokenizer's ids (a
// vocab_size rounded up, as some models ship it).
void add_padding_rows(const Scene& s, int64_t extra_rows) {
  DecoderConfig shape = testing::small_llama_shape();
  shape.vocab_size += extra_rows;
  train::write_random_llama(s.at("model"), shape, 7);
}

// ---------------------------------------------------------------- the table

struct Row {
  std::string input;                       // what is wrong, in the report's words
  std::function<void(Scene&)> spoil;       // breaks the scene that one way
  int exit_code;                           // what the user sees
  std::string file;                        // the file the error must name (relative to the scene)
  std::string says;                        // and a phrase it must hold
};

std::vector<Row> rows() {
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  const float kInf = std::numeric_limits<float>::infinity();
  return {
      // controls: the scene trains (with padding rows too: more rows than ids is fine)
      {"nothing wrong (control)", [](Scene&) {}, 0, "", "done: 1 steps"},
      {"embedding with 3 padding rows past the tokenizer's ids (control)",
       [](Scene& s) { add_padding_rows(s, 3); }, 0, "", "done: 1 steps"},

      // weights
      {"weights: truncated model.safetensors",
       [](Scene& s) { fs::resize_file(s.weights(), fs::file_size(s.weights()) / 2); }, 2,
       "model/model.safetensors", "download"},
      {"weights: header is not JSON",
       [](Scene& s) {
         std::string b = slurp(s.weights());
         b.replace(8, 12, "{not json at");
         spit(s.weights(), b);
       },
       2, "model/model.safetensors", "JSON"},
      {"weights: header length past the end of the file",
       [](Scene& s) {
         std::string b = slurp(s.weights());
         const uint64_t n = b.size() * 2;
         std::memcpy(b.data(), &n, 8);
         spit(s.weights(), b);
       },
       2, "model/model.safetensors", "header"},
      {"weights: shapes do not match config.json (intermediate_size)",
       [](Scene& s) { edit_json(s.config(), [](json& j) { j["intermediate_size"] = 96; }); }, 2,
       "model/model.safetensors", "do not match config.json"},
      {"weights: a norm stored as int32",
       [](Scene& s) {
         Safetensors st = read_safetensors(s.weights());
         st.header["model.norm.weight"]["dtype"] = "I32";
         write_safetensors(s.weights(), st);
       },
       2, "model/model.safetensors", "model.norm.weight has dtype Int"},
      {"weights: a tensor missing (model.norm.weight renamed)",
       [](Scene& s) {
         Safetensors st = read_safetensors(s.weights());
         st.header["model.final_norm.weight"] = st.header["model.norm.weight"];
         st.header.erase("model.norm.weight");
         write_safetensors(s.weights(), st);
       },
       2, "model/model.safetensors", "missing: model.norm.weight"},
      {"weights: NaN in a quantized projection",
       [kNaN](Scene& s) { poke_float(s.weights(), "model.layers.1.self_attn.q_proj.weight", 5, kNaN); }, 2,
       "model/model.safetensors", "\"model.layers.1.self_attn.q_proj.weight\" holds 1 non-finite value"},
      {"weights: inf in a norm (not quantized)",
       [kInf](Scene& s) {
         poke_float(s.weights(), "model.layers.0.input_layernorm.weight", 3, kInf);
         poke_float(s.weights(), "model.layers.0.input_layernorm.weight", 4, -kInf);
       },
       2, "model/model.safetensors", "\"model.layers.0.input_layernorm.weight\" holds 2 non-finite values"},
      {"weights: model.safetensors is a directory", [](Scene& s) { replace_by_directory(s.weights()); }, 2,
       "model/model.safetensors", "is a directory"},
      {"weights: model.path is a GGUF file",
       [](Scene& s) {
         spit(s.at("tiny.Q4_K_M.gguf"), std::string("GGUF\3\0\0\0", 8) + std::string(64, '\0'));
         s.extra = "--set model.path=" + s.at("tiny.Q4_K_M.gguf");
       },
       2, "tiny.Q4_K_M.gguf", "not GGUF files"},
      {"weights: only a .gguf in the model directory",
       [](Scene& s) {
         fs::remove(s.weights());
         spit(s.at("model/tiny.Q4_K_M.gguf"), std::string("GGUF\3\0\0\0", 8));
       },
       2, "model", "holds tiny.Q4_K_M.gguf"},

      // config.json
      {"config.json: missing", [](Scene& s) { fs::remove(s.config()); }, 2, "model", "no config.json"},
      {"config.json: not JSON", [](Scene& s) { spit(s.config(), "{\"model_type\": \"llama\",,}"); }, 2,
       "model/config.json", "not valid JSON"},
      {"config.json: a required key missing (hidden_size)",
       [](Scene& s) { edit_json(s.config(), [](json& j) { j.erase("hidden_size"); }); }, 2, "model/config.json",
       "\"hidden_size\": missing"},
      {"config.json: a bad value (num_key_value_heads 3 of 4 heads)",
       [](Scene& s) { edit_json(s.config(), [](json& j) { j["num_key_value_heads"] = 3; }); }, 2,
       "model/config.json", "does not divide num_attention_heads"},
      {"config.json: unsupported model (model_type gpt2)",
       [](Scene& s) { edit_json(s.config(), [](json& j) { j["model_type"] = "gpt2"; }); }, 2, "model/config.json",
       "\"model_type\": is \"gpt2\""},
      {"config.json: bos_token_id past vocab_size",
       [](Scene& s) { edit_json(s.config(), [](json& j) { j["bos_token_id"] = 5000; }); }, 2, "model/config.json",
       "5000 is not a token of the model: its embedding has vocab_size 261"},
      {"config.json: pad_token_id on a padding row, no token of the tokenizer",
       [](Scene& s) {
         add_padding_rows(s, 3);
         edit_json(s.config(), [](json& j) { j["pad_token_id"] = 262; });
       },
       2, "model/config.json", "pad_token_id 262 is no token of the tokenizer"},
      {"config.json: a directory", [](Scene& s) { replace_by_directory(s.config()); }, 2, "model/config.json",
       "is a directory"},
      {"config.json: max_position_embeddings below the data's examples (up to 64 tokens)",
       [](Scene& s) { edit_json(s.config(), [](json& j) { j["max_position_embeddings"] = 8; }); }, 2, "data.jsonl",
       "tokens is longer than the model's positions reach: the model's max_position_embeddings is 8"},

      // tokenizer
      {"tokenizer: missing (no tokenizer.json or tokenizer.model)", [](Scene& s) { fs::remove(s.tokenizer()); },
       2, "model", "no tokenizer.json or tokenizer.model"},
      {"tokenizer: tokenizer.json is not JSON", [](Scene& s) { spit(s.tokenizer(), "{\"model\": "); }, 2,
       "model/tokenizer.json", "not valid JSON"},
      {"tokenizer: a vocabulary entry past vocab_size",
       [](Scene& s) { edit_json(s.tokenizer(), [](json& j) { j["model"]["vocab"]["zzq"] = 300; }); }, 2,
       "model/tokenizer.json",
       "token \"zzq\" has id 300, but the model's embedding has only 261 rows (vocab_size 261"},
      {"tokenizer: an added token past vocab_size",
       [](Scene& s) {
         edit_json(s.tokenizer(), [](json& j) {
           j["added_tokens"].push_back({{"id", 4000}, {"content", "<|extra|>"}, {"special", true}});
         });
       },
       2, "model/tokenizer.json", "added token \"<|extra|>\" has id 4000"},
      {"tokenizer: an unsupported component (BertNormalizer)",
       [](Scene& s) { edit_json(s.tokenizer(), [](json& j) { j["normalizer"] = {{"type", "BertNormalizer"}}; }); }, 2,
       "model/tokenizer.json", "normalizer: type \"BertNormalizer\" is not implemented by qlora"},
      {"tokenizer: tokenizer.json is a directory", [](Scene& s) { replace_by_directory(s.tokenizer()); }, 2,
       "model/tokenizer.json", "is a directory"},

      // data
      {"data: data.path missing", [](Scene& s) { s.extra = "--set data.path=" + s.at("nope.jsonl"); }, 2,
       "nope.jsonl", "does not exist"},
      {"data: data.path is a directory",
       [](Scene& s) {
         fs::create_directories(s.at("datadir"));
         spit(s.at("datadir/train.jsonl"), completion_lines(4));
         s.extra = "--set data.path=" + s.at("datadir");
       },
       2, "datadir", "is a directory, not a file (it holds"},
      {"data: a malformed JSON line",
       [](Scene& s) {
         spit(s.data(), completion_lines(2) + "{\"prompt\": \"x\", \"completion\n" + completion_lines(2));
       },
       2, "data.jsonl:3", "malformed JSON"},
      {"data: empty file", [](Scene& s) { spit(s.data(), ""); }, 2, "data.jsonl", "no usable example"},
      {"data: chat messages read with data.format: alpaca",
       [](Scene& s) {
         spit(s.data(), R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})"
                        "\n");
         s.extra = "--set data.format=alpaca";
       },
       2, "data.jsonl:1", "this file looks like chat messages: use data.format: chat"},

      // the run config
      {"run.yaml: a misspelt key (lora.rank)",
       [](Scene& s) {
         std::string yaml = slurp(s.at("run.yaml"));
         yaml.replace(yaml.find("  r: 4\n"), 7, "  rank: 4\n");
         spit(s.at("run.yaml"), yaml);
       },
       2, "run.yaml", "did you mean"},
  };
}

struct Outcome {
  int exit_code = -1;
  std::string output;  // stdout and stderr
  double seconds = 0;
};

// The error messages: each from a line that starts with "error: " to the next such line or the
// end (a config's problems are listed on the lines after the first). One is what a user should
// see; more is a fault.
std::vector<std::string> error_messages(const std::string& output) {
  std::vector<std::string> out;
  for (size_t at = output.rfind("error: ", 0) == 0 ? 0 : output.find("\nerror: "); at != std::string::npos;) {
    if (output[at] == '\n') ++at;
    const size_t next = output.find("\nerror: ", at);
    out.push_back(output.substr(at, next == std::string::npos ? std::string::npos : next - at));
    at = next;
  }
  return out;
}

// For the table: the scene's directory as <dir>, one line, at most ~200 characters.
std::string excerpt(std::string text, const std::string& root) {
  for (size_t p; (p = text.find(root)) != std::string::npos;) text.replace(p, root.size(), "<dir>");
  for (size_t p; (p = text.find('\n')) != std::string::npos;) text.replace(p, 1, " ");
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text.size() > 200 ? text.substr(0, 197) + "..." : text;
}

TEST(CliBadInputs, EachBrokenFileExitsTwoNamingIt) {
  const std::vector<Row> table = rows();
  std::vector<Scene> scenes;
  for (size_t i = 0; i < table.size(); ++i) {
    scenes.push_back(make_scene(std::to_string(i)));
    table[i].spoil(scenes.back());
  }
  std::vector<Outcome> outcomes(table.size());
  std::atomic<size_t> next{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < kParallelRuns; ++w) {
    workers.emplace_back([&] {
      for (size_t i; (i = next++) < table.size();) {
        const Scene& s = scenes[i];
        const auto start = std::chrono::steady_clock::now();
        outcomes[i].output = testing::run_capture("OMP_NUM_THREADS=1 '" + std::string(QLORA_BIN) +
                                                      "' train --config '" + s.at("run.yaml") +
                                                      "' --device cpu --no-start-eval " + s.extra + " 2>&1",
                                                  &outcomes[i].exit_code);
        outcomes[i].seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      }
    });
  }
  for (auto& t : workers) t.join();

  std::printf("| bad input | exit | message | s |\n| --- | --- | --- | --- |\n");
  for (size_t i = 0; i < table.size(); ++i) {
    const Row& row = table[i];
    const Outcome& got = outcomes[i];
    SCOPED_TRACE(row.input);
    const std::vector<std::string> errors = error_messages(got.output);
    const size_t last = got.output.rfind('\n', got.output.size() < 2 ? 0 : got.output.size() - 2);
    const std::string last_line = last == std::string::npos ? got.output : got.output.substr(last + 1);
    std::printf("| %s | %d | %s | %.1f |\n", row.input.c_str(), got.exit_code,
                excerpt(errors.empty() ? last_line : errors.front(), scenes[i].root).c_str(), got.seconds);
    EXPECT_EQ(got.exit_code, row.exit_code) << got.output;
    EXPECT_EQ(got.output.find("frame #"), std::string::npos) << "a stack trace:\n" << got.output;
    EXPECT_EQ(got.output.find("Exception raised from"), std::string::npos) << "a stack trace:\n" << got.output;
    if (row.exit_code == 0) {
      EXPECT_TRUE(errors.empty()) << got.output;
      EXPECT_NE(got.output.find(row.says), std::string::npos) << got.output;
      continue;
    }
    if (errors.size() != 1) {
      ADD_FAILURE() << "expected one error message, got " << errors.size() << ":\n" << got.output;
      continue;
    }
    EXPECT_NE(errors[0].find(scenes[i].at(row.file)), std::string::npos)
        << "the error does not name " << row.file << ":\n" << errors[0];
    EXPECT_NE(errors[0].find(row.says), std::string::npos) << "expected \"" << row.says << "\" in:\n" << errors[0];
  }
  if (!HasFailure())  // kept for a look when a row fails
    for (const Scene& s : scenes) fs::remove_all(s.root);
}

}  // namespace
}  // namespace qlora
