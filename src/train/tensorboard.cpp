#include "qlora/train/tensorboard.h"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <stdexcept>

namespace qlora::train {
namespace {

namespace fs = std::filesystem;

// Note [tfevents records]
// A tfevents file is a sequence of records: uint64 length (little-endian), uint32 masked CRC-32C
// of those 8 bytes, the data, uint32 masked CRC-32C of the data; masked(c) = ((c >> 15) |
// (c << 17)) + 0xa282ead8. Each record's data is an Event protobuf: wall_time (field 1, double),
// step (2, varint), file_version (3, string: the first event, "brain.Event:2"), summary (5): a
// Summary of Values, each tag (1, string) and simple_value (2, float). Encoded here by hand:
// the few fields TensorBoard's scalar dashboard reads.

const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> t = [] {
    std::array<uint32_t, 256> table{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      table[i] = c;
    }
    return table;
  }();
  return t;
}

void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

template <typename T>
void fixed(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // little-endian hosts (x86-64, aarch64)
  out.append(b, sizeof(T));
}

void length_delimited(std::string& out, int field, const std::string& bytes) {
  varint(out, (static_cast<uint64_t>(field) << 3) | 2);
  varint(out, bytes.size());
  out += bytes;
}

std::string event_header(double wall_time, int64_t step) {
  std::string e;
  varint(e, (1 << 3) | 1);
  fixed(e, wall_time);
  varint(e, 2 << 3);
  varint(e, static_cast<uint64_t>(step));
  return e;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

uint32_t crc32c(const std::string& data) {
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char ch : data) c = crc_table()[(c ^ ch) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const std::string& data) {
  const uint32_t c = crc32c(data);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

TensorboardLog::TensorboardLog(const std::string& output_dir, const std::string& metrics_path) {
  const fs::path dir = fs::path(output_dir) / "runs";
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw std::runtime_error(dir.string() + ": cannot create the TensorBoard directory (" + ec.message() + ")");
  for (const auto& entry : fs::directory_iterator(dir, ec))  // derived from metrics.jsonl: rewritten below
    if (entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0) fs::remove(entry.path(), ec);
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  std::ostringstream name;
  name << "events.out.tfevents." << static_cast<int64_t>(now_seconds()) << "." << host << ".qlora";
  path_ = (dir / name.str()).string();
  out_.open(path_, std::ios::binary | std::ios::trunc);
  if (!out_) throw std::runtime_error(path_ + ": cannot open the TensorBoard event file for writing");
  std::string first = event_header(now_seconds(), 0);
  length_delimited(first, 3, "brain.Event:2");
  record(first);
  std::ifstream in(metrics_path);
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    try {
      write(nlohmann::json::parse(line));
    } catch (const nlohmann::json::exception&) {
      // a line cut short by a kill: metrics.jsonl's own readers skip it too
    }
  }
}

void TensorboardLog::record(const std::string& data) {
  std::string len;
  fixed(len, static_cast<uint64_t>(data.size()));
  std::string rec = len;
  fixed(rec, masked_crc32c(len));
  rec += data;
  fixed(rec, masked_crc32c(data));
  out_.write(rec.data(), static_cast<std::streamsize>(rec.size()));
  out_.flush();
  if (!out_) throw std::runtime_error(path_ + ": write failed (disk full?)");
}

void TensorboardLog::scalar(const std::string& tag, double value, int64_t step, double wall_time) {
  std::string v;
  length_delimited(v, 1, tag);
  varint(v, (2 << 3) | 5);
  fixed(v, static_cast<float>(value));
  std::string summary;
  length_delimited(summary, 1, v);
  std::string e = event_header(wall_time, step);
  length_delimited(e, 5, summary);
  record(e);
}

void TensorboardLog::write(const nlohmann::json& j) {
  if (!j.is_object() || !j.contains("step") || !j.contains("type")) return;
  const int64_t step = j["step"].get<int64_t>();
  const double t = now_seconds();
  const auto put = [&](const char* key, const std::string& tag, double scale = 1.0) {
    if (j.contains(key) && j[key].is_number()) scalar(tag, j[key].get<double>() * scale, step, t);
  };
  if (j["type"] == "train") {
    put("loss", "train/loss");
    put("lr", "train/learning_rate");
    put("grad_norm", "train/grad_norm");
    put("tokens_per_second", "train/tokens_per_second");
    put("memory_bytes", "train/memory_gib", 1.0 / (1024.0 * 1024.0 * 1024.0));
    put("loss_scale", "train/loss_scale");
  } else if (j["type"] == "eval") {
    put("loss", "eval/loss");
    put("accuracy", "eval/exact_match");
  }
}

}  // namespace qlora::train
