// Single-thread tokenizer throughput on a fixed corpus, to set beside Hugging Face tokenizers
// (scripts/bench_tokenizer.py writes the corpus and measures the Python library the same way):
//
//   .venv/bin/python scripts/bench_tokenizer.py --write-corpus /tmp/corpus.txt
//   build/bench/bench_tokenizer --corpus /tmp/corpus.txt ../shared/data/qwen2-tokenizer/tokenizer.json ...
//
// Every line of the corpus, with its "\n", is encoded on its own (no special tokens), as the
// Python script does; the best of --repeat passes is reported. One JSON line per tokenizer:
// {"bench":"tokenizer","system":"qlora",...,"mb_per_s":..,"tokens_per_s":..,"cpu_seconds":..}
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "qlora/ckpt/sha256.h"
#include "qlora/data/tokenizer.h"

namespace {

double cpu_now() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

}  // namespace

int main(int argc, char** argv) {
  std::string corpus_path;
  int repeat = 2;
  std::vector<std::string> tokenizers;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--corpus" && i + 1 < argc) corpus_path = argv[++i];
    else if (a == "--repeat" && i + 1 < argc) repeat = std::atoi(argv[++i]);
    else tokenizers.push_back(a);
  }
  if (corpus_path.empty() || tokenizers.empty()) {
    std::fprintf(stderr, "usage: bench_tokenizer --corpus FILE [--repeat N] TOKENIZER...\n");
    return 2;
  }
  at::set_num_threads(1);
  std::ifstream in(corpus_path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  std::vector<std::string_view> lines;
  for (size_t at = 0; at < text.size();) {
    size_t nl = text.find('\n', at);
    nl = nl == std::string::npos ? text.size() : nl + 1;
    lines.emplace_back(text.data() + at, nl - at);
    at = nl;
  }
  const std::string sha = qlora::ckpt::sha256_hex(text);
  for (const std::string& path : tokenizers) {
    const auto tok = qlora::data::load_tokenizer(path);
    double best = 1e30, best_cpu = 0;
    int64_t tokens = 0;
    for (int r = 0; r < repeat; ++r) {
      tokens = 0;
      const double c0 = cpu_now();
      const auto t0 = std::chrono::steady_clock::now();
      for (const auto& line : lines) tokens += static_cast<int64_t>(tok->encode(line).size());
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (s < best) best = s, best_cpu = cpu_now() - c0;
    }
    nlohmann::ordered_json j = {{"bench", "tokenizer"},    {"system", "qlora"},
                                {"tokenizer", path},       {"kind", tok->kind()},
                                {"bytes", text.size()},    {"lines", lines.size()},
                                {"tokens", tokens},        {"seconds", best},
                                {"cpu_seconds", best_cpu}, {"mb_per_s", static_cast<double>(text.size()) / best / 1e6},
                                {"mb_per_s_cpu", static_cast<double>(text.size()) / best_cpu / 1e6},
                                {"tokens_per_s", static_cast<double>(tokens) / best},
                                {"corpus_sha256", sha}};
    std::cout << j.dump() << std::endl;
  }
  return 0;
}
