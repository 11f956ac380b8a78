// ckpt/sha256: SHA-256 (FIPS 180-4), our own implementation, for checkpoint
// manifests. A streaming hasher plus two one-call helpers. No torch, no I/O
// beyond sha256_file.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace qlora::ckpt {

// ---------------------------------------------------------------- streaming
// Feed bytes with update() as often as needed; digest()/hex_digest() may be
// called at any point (they finish a copy of the state) and hashing may go on.
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  void update(std::string_view bytes) { update(bytes.data(), bytes.size()); }
  std::array<uint8_t, 32> digest() const;
  std::string hex_digest() const;  // 64 lowercase hex characters

 private:
  void compress(const uint8_t* block);  // one 64-byte block into state_

  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> buffer_{};  // a partial block
  size_t buffered_ = 0;                // bytes in buffer_
  uint64_t total_bytes_ = 0;
};

// ---------------------------------------------------------------- one call
std::string sha256_hex(std::string_view bytes);

// Reads `path` in chunks. Throws qlora::InputError naming the file and the OS
// error when it cannot be opened or read.
std::string sha256_file(const std::string& path);

}  // namespace qlora::ckpt
