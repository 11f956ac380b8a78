#include "qlora/lora/gguf_merge.h"

#include <ATen/ATen.h>

#include <cmath>
#include <filesystem>
#include <sstream>

#include "gguf_vocab.h"
#include "qlora/common/errors.h"
#include "qlora/lora/gguf_export.h"
#include "qlora/model/family.h"

namespace qlora::lora {
namespace {

namespace fs = std::filesystem;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// One tensor of the file: where it comes from and what is done to it on the way.
struct Planned {
  std::string hf_name;  // the base tensor, or "" for a tensor computed here (RoPE factors)
  io::GgufTensorInfo info;
  int64_t rope_heads = 0;   // > 0: llama.cpp's llama q/k row order, this many heads
  bool plus_one = false;    // Gemma's norm: stored as 1 + w
  std::vector<float> data;  // computed tensors
};

// llama.cpp's name of a base tensor, "" for one it does not load (inv_freq; lm_head when tied or
// for Gemma 2). InputError for a tensor it has no name for.
std::string gguf_name_of(const std::string& hf, const DecoderConfig& c, const std::string& arch) {
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return c.tie_word_embeddings || arch == "gemma2" ? "" : "output.weight";
  if (ends_with(hf, "rotary_emb.inv_freq")) return "";
  const std::string prefix = "model.layers.";
  if (hf.rfind(prefix, 0) == 0) {
    const size_t dot = hf.find('.', prefix.size());
    const std::string layer = hf.substr(prefix.size(), dot - prefix.size());
    const std::string rest = dot == std::string::npos ? "" : hf.substr(dot + 1);
    const size_t last = rest.rfind('.');
    const std::string module = rest.substr(0, last), suffix = last == std::string::npos ? "" : rest.substr(last);
    std::string name;
    if (module == "input_layernorm") name = "attn_norm";
    else if (module == "post_attention_layernorm") name = c.pieces.sandwich_norms ? "post_attention_norm" : "ffn_norm";
    else if (module == "pre_feedforward_layernorm") name = "ffn_norm";
    else if (module == "post_feedforward_layernorm") name = "post_ffw_norm";
    else if (module == "self_attn.q_norm") name = "attn_q_norm";
    else if (module == "self_attn.k_norm") name = "attn_k_norm";
    else if (module.rfind("self_attn.", 0) == 0 || module.rfind("mlp.", 0) == 0)
      name = gguf_tensor_of(module.substr(module.find('.') + 1));
    if (!name.empty() && (suffix == ".weight" || suffix == ".bias")) return "blk." + layer + "." + name + suffix;
  }
  throw InputError("base tensor " + hf + ": llama.cpp's " + arch + " architecture has no tensor for it");
}

std::string number(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// The architecture's hyper-parameter keys, as llama.cpp's converter writes them for the family.
// InputError for what llama.cpp would compute differently.
void add_hyper_parameters(io::GgufMetadata& md, const DecoderConfig& c, const std::string& arch,
                          std::vector<std::string>& notes) {
  auto key = [&](const std::string& k) { return arch + "." + k; };
  auto u32 = [](int64_t v) { return static_cast<uint32_t>(v); };
  md.emplace_back(key("context_length"), u32(c.max_position_embeddings));
  md.emplace_back(key("embedding_length"), u32(c.hidden_size));
  md.emplace_back(key("block_count"), u32(c.num_hidden_layers));
  md.emplace_back(key("feed_forward_length"), u32(c.intermediate_size));
  md.emplace_back(key("attention.head_count"), u32(c.num_attention_heads));
  md.emplace_back(key("attention.head_count_kv"), u32(c.num_key_value_heads));
  md.emplace_back(key("attention.layer_norm_rms_epsilon"), static_cast<float>(c.rms_norm_eps));
  md.emplace_back(key("attention.key_length"), u32(c.head_dim));
  md.emplace_back(key("attention.value_length"), u32(c.head_dim));
  md.emplace_back(key("rope.freq_base"), static_cast<float>(c.rope_theta));
  if (arch == "llama" || arch == "phi3") md.emplace_back(key("rope.dimension_count"), u32(c.rotary_dim()));
  if (arch == "llama") md.emplace_back(key("vocab_size"), u32(c.vocab_size));

  const RopeScaling& rope = c.rope;
  switch (rope.type) {
    case RopeType::kDefault:
    case RopeType::kLlama3: break;  // llama3: the rope_freqs tensor
    case RopeType::kLinear:
      md.emplace_back(key("rope.scaling.type"), std::string("linear"));
      md.emplace_back(key("rope.scaling.factor"), static_cast<float>(rope.factor));
      break;
    case RopeType::kYarn:
      md.emplace_back(key("rope.scaling.type"), std::string("yarn"));
      md.emplace_back(key("rope.scaling.factor"), static_cast<float>(rope.factor));
      md.emplace_back(key("rope.scaling.original_context_length"), u32(rope.original_max_position_embeddings));
      md.emplace_back(key("rope.scaling.yarn_beta_fast"), static_cast<float>(rope.beta_fast));
      md.emplace_back(key("rope.scaling.yarn_beta_slow"), static_cast<float>(rope.beta_slow));
      break;
    case RopeType::kDynamic:
      throw InputError("config.json rope_scaling dynamic (NTK scaling that grows with the sequence): llama.cpp has "
                       "no such scaling, so the GGUF model would compute something else. Merge to a Hugging Face "
                       "directory (--out) instead");
    case RopeType::kLongrope:
      if (arch != "phi3") throw InputError("longrope RoPE scaling is written for llama.cpp's phi3 only");
      md.emplace_back(key("rope.scaling.attn_factor"), static_cast<float>(rope.attention_factor));
      break;
  }
  if (arch == "phi3") {
    md.emplace_back(key("rope.scaling.original_context_length"), u32(rope.original_max_position_embeddings));
    md.emplace_back(key("attention.sliding_window"), u32(c.min_window()));
  }
  if (arch == "gemma2" || arch == "gemma3") {
    const double per_head = static_cast<double>(c.head_dim),
                 per_hidden = static_cast<double>(c.hidden_size) / static_cast<double>(c.num_attention_heads);
    if (c.query_pre_attn_scalar != 0 && c.query_pre_attn_scalar != per_head && c.query_pre_attn_scalar != per_hidden)
      throw InputError("config.json query_pre_attn_scalar " + number(c.query_pre_attn_scalar) + ": llama.cpp's " +
                       arch + " scales attention by head_dim (" + number(per_head) +
                       ") or, for the 27B size, hidden_size / num_attention_heads; this model would compute "
                       "something else there");
    // Which layers slide: llama.cpp's period p makes layer i slide iff i % p < p - 1.
    const int64_t n = c.num_hidden_layers;
    int64_t period = 0;
    for (int64_t p = 1; p <= n + 1 && period == 0; ++p) {
      bool fits = true;
      for (int64_t i = 0; i < n; ++i) fits = fits && ((c.window_of(i) > 0) == (i % p < p - 1));
      if (fits) period = p;
    }
    if (c.min_window() > 0) {
      if (period == 0)
        throw InputError("the model's sliding-window layers follow no period llama.cpp's " + arch + " can express");
      md.emplace_back(key("attention.sliding_window"), u32(c.min_window()));
      md.emplace_back(key("attention.sliding_window_pattern"), u32(period));
    }
    if (arch == "gemma2") md.emplace_back(key("attn_logit_softcapping"), static_cast<float>(c.attn_logit_softcapping));
    if (arch == "gemma2" || c.final_logit_softcapping != 0)
      md.emplace_back(key("final_logit_softcapping"), static_cast<float>(c.final_logit_softcapping));
    if (arch == "gemma3" && c.rope_local_theta > 0)
      md.emplace_back(key("rope.freq_base_swa"), static_cast<float>(c.rope_local_theta));
  } else if (c.min_window() > 0 && arch != "phi3") {
    notes.push_back("llama.cpp's " + arch + " attends to the whole context: the model's sliding window of " +
                    std::to_string(c.min_window()) + " tokens is not applied there");
  }
}

// Llama 3's RoPE scaling as llama.cpp's per-frequency divisors (its rope_freqs tensor).
std::vector<float> llama3_rope_factors(const DecoderConfig& c) {
  const RopeScaling& r = c.rope;
  const double old_ctx = static_cast<double>(r.original_max_position_embeddings);
  const double low_wavelen = old_ctx / r.low_freq_factor, high_wavelen = old_ctx / r.high_freq_factor;
  const int64_t dim = c.rotary_dim();
  std::vector<float> out;
  for (int64_t i = 0; i < dim; i += 2) {
    const float freq = 1.0f / std::pow(static_cast<float>(c.rope_theta), static_cast<float>(i) / static_cast<float>(dim));
    const double wavelen = 2 * M_PI / freq;
    if (wavelen < high_wavelen) {
      out.push_back(1.0f);
    } else if (wavelen > low_wavelen) {
      out.push_back(static_cast<float>(r.factor));
    } else {
      const double smooth = (old_ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
      out.push_back(static_cast<float>(1 / ((1 - smooth) / r.factor + smooth)));
    }
  }
  return out;
}

std::string mib_text(uint64_t bytes) {
  std::ostringstream os;
  os.precision(bytes < (10ull << 20) ? 2 : 0);
  os << std::fixed << static_cast<double>(bytes) / (1 << 20) << " MiB";
  return os.str();
}

}  // namespace

io::GgufType gguf_merge_type(const std::string& type) {
  if (type == "f16") return io::GgufType::kF16;
  if (type == "bf16") return io::GgufType::kBF16;
  if (type == "q8_0") return io::GgufType::kQ8_0;
  throw InputError("--type " + type + ": expected f16, bf16 or q8_0 (the GGUF tensor type of the merged weights)");
}

GgufMergeResult write_merged_gguf(const MergeOptions& opt, const std::string& gguf_path, const std::string& type,
                                  bool force) {
  auto progress = [&](const std::string& line) {
    if (opt.progress) opt.progress(line);
  };
  const io::GgufType wtype = gguf_merge_type(type);
  std::error_code ec;
  if (gguf_path.empty()) throw InputError("--gguf: give the GGUF file to write");
  if (fs::is_directory(gguf_path, ec)) throw InputError("--gguf " + gguf_path + ": is a directory; name a file");
  if (fs::exists(gguf_path, ec) && !force)
    throw InputError("--gguf " + gguf_path + ": exists; remove it, choose another name, or pass --force to replace it");
  const fs::path parent = fs::absolute(fs::path(gguf_path)).parent_path();
  if (!fs::is_directory(parent, ec)) throw InputError("--gguf " + gguf_path + ": directory " + parent.string() + " does not exist");

  // Everything that can be refused is refused before the merge starts.
  const io::ModelDir base_dir = io::ModelDir::open(opt.base_dir);
  const DecoderConfig c = read_decoder_config(base_dir.config_path());
  GgufMergeResult r;
  r.path = gguf_path;
  r.type = type;
  r.architecture = gguf_architecture_of(c);
  const std::string& arch = r.architecture;
  io::GgufMetadata md;
  md.emplace_back("general.architecture", arch);
  md.emplace_back("general.type", std::string("model"));
  md.emplace_back("general.name", fs::absolute(fs::path(opt.base_dir)).lexically_normal().filename().string());
  // llama_ftype: mostly F16 1, mostly Q8_0 7, mostly BF16 32.
  md.emplace_back("general.file_type",
                  static_cast<uint32_t>(wtype == io::GgufType::kF16 ? 1 : wtype == io::GgufType::kQ8_0 ? 7 : 32));
  md.emplace_back("general.quantization_version", static_cast<uint32_t>(2));
  std::vector<std::string> notes;
  add_hyper_parameters(md, c, arch, notes);
  const detail::GgufVocab vocab = detail::read_gguf_vocab({opt.adapter_dir, opt.base_dir}, c);
  for (const auto& kv : vocab.metadata) md.push_back(kv);
  r.tokenizer_model = vocab.model;
  r.tokenizer_pre = vocab.pre;
  r.tokens = vocab.tokens;
  if (!vocab.pre_recognized)
    notes.push_back("tokenizer.json's pre-tokenizer is none llama.cpp names here: written as \"default\", so "
                    "llama.cpp may split text differently from transformers");

  std::vector<Planned> plan;
  if (c.rope.type == RopeType::kLlama3) {
    Planned p;
    p.data = llama3_rope_factors(c);
    p.info = {"rope_freqs.weight", {static_cast<int64_t>(p.data.size())}, io::GgufType::kF32};
    plan.push_back(std::move(p));
  }
  if (c.rope.type == RopeType::kLongrope)
    for (const auto& [name, f] : {std::pair<const char*, const std::vector<double>*>{"rope_factors_long.weight",
                                                                                      &c.rope.long_factor},
                                  {"rope_factors_short.weight", &c.rope.short_factor}}) {
      Planned p;
      p.data.assign(f->begin(), f->end());
      p.info = {name, {static_cast<int64_t>(p.data.size())}, io::GgufType::kF32};
      plan.push_back(std::move(p));
    }
  std::vector<std::string> unaligned;
  for (const std::string& hf : base_dir.tensor_names()) {
    const std::string name = gguf_name_of(hf, c, arch);
    if (name.empty()) continue;
    const io::TensorInfo& info = *base_dir.info(hf);
    Planned p;
    p.hf_name = hf;
    p.info = {name, info.shape, info.shape.size() >= 2 ? wtype : io::GgufType::kF32};
    if (name == "token_embd.weight" && info.shape[0] != vocab.tokens)
      throw InputError(hf + " has " + std::to_string(info.shape[0]) + " rows, the vocabulary " +
                       std::to_string(vocab.tokens));
    if (arch == "llama" && (ends_with(hf, "self_attn.q_proj.weight") || ends_with(hf, "self_attn.q_proj.bias")))
      p.rope_heads = c.num_attention_heads;
    if (arch == "llama" && (ends_with(hf, "self_attn.k_proj.weight") || ends_with(hf, "self_attn.k_proj.bias")))
      p.rope_heads = c.num_key_value_heads;
    p.plus_one = c.pieces.norm_plus_one && ends_with(hf, "norm.weight");
    if (p.info.type == io::GgufType::kQ8_0 && info.shape.back() % io::kQ8_0Block != 0)
      unaligned.push_back(hf + " " + std::to_string(info.shape.back()));
    plan.push_back(std::move(p));
  }
  if (!unaligned.empty()) {
    std::string list;
    for (size_t i = 0; i < unaligned.size() && i < 6; ++i) list += "\n  - " + unaligned[i];
    if (unaligned.size() > 6) list += "\n  - ... and " + std::to_string(unaligned.size() - 6) + " more";
    throw InputError("--type q8_0 quantizes rows in blocks of 32 values; these tensors have rows of another length "
                     "(name, row length):" + list + "\nWrite this model with --type f16 or bf16");
  }

  MergedWeights weights(opt);
  progress("gguf     " + gguf_path + ": llama.cpp's " + arch + ", " + std::to_string(plan.size()) + " tensors, " +
           io::gguf_type_name(wtype) + " weights (1-D tensors F32), tokenizer " + vocab.model + " (pre " + vocab.pre +
           ", " + std::to_string(vocab.tokens) + " tokens)");
  for (const auto& n : notes) progress("note     " + n);
  std::vector<io::GgufTensorInfo> infos;
  for (const Planned& p : plan) infos.push_back(p.info);
  io::GgufWriter writer(gguf_path, md, infos);
  std::vector<uint8_t> q8;
  for (Planned& p : plan) {
    if (p.hf_name.empty()) {
      writer.write_next(p.data.data(), p.data.size() * 4);
      continue;
    }
    at::Tensor t = weights.merged(p.hf_name);
    if (p.rope_heads > 0) t = gguf_llama_rope_rows(t, p.rope_heads);
    if (p.plus_one) t = t.to(at::kFloat) + 1.0;  // Gemma's (1 + w), in fp32
    switch (p.info.type) {
      case io::GgufType::kF32: t = t.to(at::kFloat).contiguous(); break;
      case io::GgufType::kF16: t = t.to(at::kHalf).contiguous(); break;
      case io::GgufType::kBF16: t = t.to(at::kBFloat16).contiguous(); break;
      case io::GgufType::kQ8_0: {
        t = t.to(at::kFloat).contiguous();
        q8.resize(io::gguf_bytes(io::GgufType::kQ8_0, t.numel()));
        io::quantize_q8_0(t.data_ptr<float>(), t.numel(), q8.data());
        writer.write_next(q8.data(), q8.size());
        continue;
      }
    }
    writer.write_next(t.data_ptr(), static_cast<uint64_t>(t.nbytes()));
  }
  writer.finish();
  r.tensors = static_cast<int64_t>(plan.size());
  r.bytes = fs::file_size(gguf_path, ec);
  progress("wrote    " + gguf_path + " (" + std::to_string(r.tensors) + " tensors, " + mib_text(r.bytes) + "; " +
           std::to_string(weights.merged_modules().size()) + " adapted projections merged" +
           (opt.from_nf4 ? ", into the NF4 round trip of " + std::to_string(weights.nf4_round_trips()) + " projections"
                         : std::string()) +
           ")");
  return r;
}

}  // namespace qlora::lora
