// ckpt/sha256: the FIPS 180-2 / NIST example vectors, streaming in uneven
// pieces, and files compared with GNU coreutils' sha256sum.
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "qlora/ckpt/sha256.h"
#include "qlora/common/errors.h"
#include "support/test_support.h"

namespace qlora::ckpt {
namespace {

// ---------------------------------------------------------------- NIST vectors
struct Vector {
  const char* name;
  std::string message;
  const char* sha256;
};

std::vector<Vector> nist_vectors() {
  return {
      {"empty", "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      {"abc", "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
      {"448 bits", "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
       "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
      {"896 bits",
       "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrs"
       "mnopqrstnopqrstu",
       "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"},
      {"one million a", std::string(1000000, 'a'),
       "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"},
  };
}

TEST(Sha256, NistVectorsInOneCall) {
  for (const auto& v : nist_vectors()) EXPECT_EQ(sha256_hex(v.message), v.sha256) << v.name;
}

// Every split of the message into pieces of seeded random sizes (0..130 bytes,
// so block boundaries and the 56-byte padding edge are crossed both ways).
TEST(Sha256, NistVectorsStreamedInRandomPieces) {
  std::mt19937 rng(20261124);
  for (const auto& v : nist_vectors()) {
    for (int trial = 0; trial < 5; ++trial) {
      Sha256 h;
      size_t pos = 0;
      while (pos < v.message.size()) {
        const size_t n = std::min<size_t>(rng() % 131, v.message.size() - pos);
        h.update(v.message.data() + pos, n);
        pos += n;
      }
      EXPECT_EQ(h.hex_digest(), v.sha256) << v.name << " trial " << trial;
    }
  }
}

// Lengths 0..200 around the padding edges: one-call and byte-by-byte agree, and
// taking a digest midway does not disturb the stream.
TEST(Sha256, DigestMidwayDoesNotDisturbTheStream) {
  std::mt19937 rng(7);
  std::string message(200, '\0');
  for (auto& c : message) c = static_cast<char>(rng());
  for (size_t len = 0; len <= message.size(); ++len) {
    Sha256 h;
    for (size_t i = 0; i < len; ++i) {
      h.update(&message[i], 1);
      if (i % 17 == 0) (void)h.hex_digest();
    }
    EXPECT_EQ(h.hex_digest(), sha256_hex(std::string_view(message).substr(0, len))) << "length " << len;
  }
  // Two digests of the same state are equal.
  Sha256 h;
  h.update("abc");
  EXPECT_EQ(h.hex_digest(), h.hex_digest());
}

// ---------------------------------------------------------------- files
TEST(Sha256, FileMatchesCoreutilsSha256sum) {
  const std::string dir = testing::make_temp_dir("sha256");
  // Expected value obtained on the dev machine with
  //   printf 'qlora checkpoint manifest test\nline two\n' | sha256sum
  const std::string small = testing::write_file(dir, "small.txt", "qlora checkpoint manifest test\nline two\n");
  EXPECT_EQ(sha256_file(small), "b2ad40788f9d21a2ff76f48bb73f381b99b620dc2f3aae4bb70966fde962cd99");

  // Larger than sha256_file's 1 MiB read chunk, odd length. Expected value from
  //   python3 -c "import sys; sys.stdout.buffer.write(bytes(((i*31+7)*(i>>8)+i)&0xff
  //               for i in range(3000001)))" | sha256sum
  std::string big(3000001, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(((i * 31 + 7) * (i >> 8) + i) & 0xff);
  const std::string big_path = dir + "/big.bin";
  std::ofstream(big_path, std::ios::binary).write(big.data(), static_cast<std::streamsize>(big.size()));
  EXPECT_EQ(sha256_file(big_path), "16f19af5a6e2d5308cc91e792c783c68a38ca5b2a4660ca4967c57ab792c093e");
  EXPECT_EQ(sha256_hex(big), sha256_file(big_path));
  std::filesystem::remove_all(dir);
}

TEST(Sha256, UnreadableFileNamesTheFile) {
  const std::string dir = testing::make_temp_dir("sha256");
  const std::string missing = dir + "/no-such-file.bin";
  try {
    sha256_file(missing);
    FAIL() << "sha256_file of a missing file did not throw";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("No such file"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace qlora::ckpt
