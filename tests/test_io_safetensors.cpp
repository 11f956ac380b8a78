// io/safetensors: files written by the Python safetensors package read back exactly; our writer
// reproduces that package's bytes; round trips through the torch bridge; and a table of crafted
// bad files (one row per way a file can be wrong), each refused with an InputError that names
// the file and says what is wrong, never a crash.
#include <gtest/gtest.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "../src/io/safetensors_format.h"  // detail::parse_safetensors (private to io)
#include "qlora/common/errors.h"
#include "qlora/io/safetensors.h"
#include "qlora/io/torch_io.h"
#include "support/test_support.h"

namespace qlora::io {
namespace {

namespace fs = std::filesystem;
using testing::make_temp_dir;
using testing::source_path;

using testing::slurp;

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
  ASSERT_TRUE(out.good()) << path;
}

std::string hex(const uint8_t* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) out += {d[p[i] >> 4], d[p[i] & 15]};
  return out;
}

// 8-byte little-endian length + header + data.
std::string image(const std::string& header, const std::string& data = "", uint64_t length = UINT64_MAX) {
  uint64_t n = length == UINT64_MAX ? header.size() : length;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

// `n` seeded random bytes (never zeros: a reader that ignored the offsets would still differ).
std::string random_bytes(size_t n, uint32_t seed = 7) {
  std::mt19937 rng(seed);
  std::string out(n, '\0');
  for (auto& c : out) c = static_cast<char>(1 + rng() % 255);
  return out;
}

nlohmann::json read_json(const std::string& path) {
  return nlohmann::json::parse(slurp(path));
}

// ---------------------------------------------------------------- golden: Python-written file

const std::string kGood = "tests/data/io/good_dtypes.safetensors";

TEST(SafetensorsRead, PythonWrittenFileMatchesSidecar) {
  const auto expected = read_json(source_path("tests/data/io/good_dtypes.json"));
  auto file = SafetensorsFile::open(source_path(kGood));
  EXPECT_EQ(file->metadata(), (expected["metadata"].get<std::map<std::string, std::string>>()));
  ASSERT_EQ(file->tensors().size(), expected["tensors"].size());
  for (const auto& [name, e] : expected["tensors"].items()) {
    SCOPED_TRACE(name);
    const TensorInfo* info = file->find(name);
    ASSERT_NE(info, nullptr);
    EXPECT_STREQ(dtype_name(info->dtype), e["dtype"].get<std::string>().c_str());
    EXPECT_EQ(info->shape, e["shape"].get<std::vector<int64_t>>());
    EXPECT_EQ(hex(file->data(*info), info->nbytes()), e["hex"].get<std::string>());
    // Values through the torch bridge: exact (every dtype converts to float64 without rounding).
    at::Tensor t = tensor_view(file, *info);
    EXPECT_EQ(t.scalar_type(), to_scalar_type(info->dtype));
    EXPECT_EQ(std::vector<int64_t>(t.sizes().begin(), t.sizes().end()), info->shape);
    at::Tensor v = t.to(at::kDouble).contiguous().reshape({-1});
    auto want = e["values"].get<std::vector<double>>();
    ASSERT_EQ(v.numel(), static_cast<int64_t>(want.size()));
    for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(v[i].item<double>(), want[i]) << "element " << i;
    // The Python package aligns every tensor, so the view is the mapping itself.
    if (info->nbytes() > 0) {
      EXPECT_EQ(static_cast<const void*>(t.data_ptr()), static_cast<const void*>(file->data(*info)));
    }
  }
  EXPECT_EQ(file->find("absent"), nullptr);
}

// Note on names: "layers.0/../odd name" is a valid safetensors name and we accept it as a name.
// It is harmless because no code turns a tensor name into a path (ModelDir resolves shard file
// names from the index, which it does check: test_io_model_dir.cpp, ShardOutsideDirectory).
TEST(SafetensorsRead, DotDotInTensorNameIsJustAName) {
  auto file = SafetensorsFile::open(source_path(kGood));
  EXPECT_NE(file->find("layers.0/../odd name"), nullptr);
}

TEST(SafetensorsRead, ViewKeepsMappingAlive) {
  at::Tensor t;
  std::vector<float> before;
  {
    auto file = SafetensorsFile::open(source_path(kGood));
    t = tensor_view(file, *file->find("f32.weight"));
    before.assign(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
  }  // the caller's handle is gone; the storage still holds the mapping
  ASSERT_EQ(static_cast<size_t>(t.numel()), before.size());
  for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(t.data_ptr<float>()[i], before[i]);
}

// ---------------------------------------------------------------- writer

// Our writer, given the tensors of the Python-written file, writes exactly its bytes: same
// order (descending alignment, then name), same compact JSON, same padding.
TEST(SafetensorsWrite, ReproducesPythonPackageBytes) {
  auto file = SafetensorsFile::open(source_path(kGood));
  std::vector<TensorToWrite> rows;
  for (const TensorInfo& t : file->tensors()) rows.push_back({t.name, t.dtype, t.shape, file->data(t), t.nbytes()});
  std::reverse(rows.begin(), rows.end());  // the writer must sort, not trust the caller's order
  const std::string out = make_temp_dir("io") + "/again.safetensors";
  write_safetensors(out, rows, file->metadata());
  EXPECT_EQ(slurp(out), slurp(source_path(kGood)));
}

TEST(SafetensorsWrite, RoundTripAlignedAndAtomic) {
  const std::string dir = make_temp_dir("io");
  const std::string path = dir + "/rt.safetensors";
  // One tensor per dtype, odd sizes so that a wrong order would misalign the wider types.
  std::vector<std::string> payloads;
  std::vector<TensorToWrite> rows;
  const DType all[] = {DType::U8, DType::F16, DType::F64, DType::BOOL, DType::I32, DType::BF16,
                       DType::I8, DType::F32, DType::I64, DType::I16, DType::F8_E4M3, DType::F8_E5M2};
  uint32_t seed = 1;
  for (DType d : all) {
    std::vector<int64_t> shape = {3, static_cast<int64_t>(seed % 3 + 1)};
    size_t n = 3 * (seed % 3 + 1) * dtype_size(d);
    payloads.push_back(random_bytes(n, seed));
    if (d == DType::BOOL)
      for (auto& c : payloads.back()) c = static_cast<char>(c & 1);
    rows.push_back({std::string("t.") + dtype_name(d), d, shape, nullptr, n});
    ++seed;
  }
  for (size_t i = 0; i < rows.size(); ++i) rows[i].data = payloads[i].data();
  rows.push_back({"scalar", DType::F32, {}, payloads[0].data(), 4});
  rows.push_back({"empty", DType::F32, {0, 5}, nullptr, 0});
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"z", "quote \" and ünïcode"}};
  write_safetensors(path, rows, meta);
  write_safetensors(path, rows, meta);  // overwriting an existing file works

  auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->metadata(), meta);
  EXPECT_EQ(file->data_offset() % 8, 0u);
  ASSERT_EQ(file->tensors().size(), rows.size());
  for (const auto& r : rows) {
    SCOPED_TRACE(r.name);
    const TensorInfo* t = file->find(r.name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, r.dtype);
    EXPECT_EQ(t->shape, r.shape);
    ASSERT_EQ(t->nbytes(), r.nbytes);
    if (r.nbytes) {
      EXPECT_EQ(std::memcmp(file->data(*t), r.data, r.nbytes), 0);
    }
    EXPECT_EQ(reinterpret_cast<uintptr_t>(file->data(*t)) % dtype_size(t->dtype), 0u) << "misaligned";
  }
  for (const auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << "temp file left: " << e.path();
}

TEST(SafetensorsWrite, FailureNamesPathAndLeavesNoTempFile) {
  const std::string dir = make_temp_dir("io");
  const std::string path = dir + "/missing_subdir/x.safetensors";
  float v = 1.5f;
  try {
    write_safetensors(path, {{"v", DType::F32, {1}, &v, 4}});
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  EXPECT_TRUE(fs::is_empty(dir));
}

TEST(SafetensorsWrite, RejectsCallerMistakes) {
  const std::string path = make_temp_dir("io") + "/x.safetensors";
  float v[2] = {1, 2};
  EXPECT_THROW(write_safetensors(path, {{"v", DType::F32, {3}, v, 8}}), std::invalid_argument);
  EXPECT_THROW(write_safetensors(path, {{"v", DType::F32, {2}, v, 8}, {"v", DType::F32, {2}, v, 8}}),
               std::invalid_argument);
  EXPECT_THROW(write_safetensors(path, {{"", DType::F32, {2}, v, 8}}), std::invalid_argument);
  EXPECT_THROW(write_safetensors(path, {{"__metadata__", DType::F32, {2}, v, 8}}), std::invalid_argument);
  EXPECT_THROW(write_safetensors(path, {{"bad\xff", DType::F32, {2}, v, 8}}), std::invalid_argument);
  EXPECT_FALSE(fs::exists(path));
}

// ---------------------------------------------------------------- torch bridge

TEST(TorchIo, SaveLoadKeepsHalfTypesAndValues) {
  const std::string path = make_temp_dir("io") + "/t.safetensors";
  at::manual_seed(11);
  at::Tensor base = at::randn({6, 5});
  std::vector<std::pair<std::string, at::Tensor>> in = {
      {"bf16", base.to(at::kBFloat16)},
      {"fp16", base.to(at::kHalf)},
      {"fp32_transposed", base.t()},  // non-contiguous: saved as its contiguous copy
      {"i64", at::randint(-1000, 1000, {7}, at::kLong)},
      {"mask", base > 0},
  };
  save_safetensors(path, in, {{"k", "v"}});
  auto out = load_safetensors(path);
  ASSERT_EQ(out.size(), in.size());
  for (const auto& [name, t] : in) {
    SCOPED_TRACE(name);
    const at::Tensor& got = out.at(name);
    EXPECT_EQ(got.scalar_type(), t.scalar_type());
    EXPECT_TRUE(got.equal(t));
  }
  // load_safetensors copies: writing into its tensors is allowed.
  out.at("bf16").add_(1);
  EXPECT_EQ(SafetensorsFile::open(path)->metadata().at("k"), "v");
}

// A header padded to an odd length puts an F32 tensor at an odd address: the bridge copies.
TEST(TorchIo, MisalignedTensorIsCopied) {
  const std::string path = make_temp_dir("io") + "/odd.safetensors";
  std::string header = R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})";
  if ((8 + header.size()) % 2 == 0) header += ' ';  // data starts at an odd offset
  const float vals[3] = {1.25f, -2.5f, 3.75f};
  spit(path, image(header, std::string(reinterpret_cast<const char*>(vals), 12)));
  auto file = SafetensorsFile::open(path);
  at::Tensor t = tensor_view(file, *file->find("x"));
  EXPECT_NE(static_cast<const void*>(t.data_ptr()), static_cast<const void*>(file->data(*file->find("x"))));
  EXPECT_EQ(t[0].item<float>(), 1.25f);
  EXPECT_EQ(t[1].item<float>(), -2.5f);
  EXPECT_EQ(t[2].item<float>(), 3.75f);
}

TEST(TorchIo, BoolBytesOtherThanZeroOrOneAreRefused) {
  const std::string path = make_temp_dir("io") + "/bool.safetensors";
  spit(path, image(R"({"m":{"dtype":"BOOL","shape":[4],"data_offsets":[0,4]}})", std::string("\x01\x00\x02\x01", 4)));
  auto file = SafetensorsFile::open(path);
  try {
    tensor_view(file, *file->find("m"));
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("BOOL element 2 is 2"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------- bad files

// One crafted file per way a safetensors file can be wrong. `tensor` is the name the message
// must quote (empty: a file-level problem).
struct BadFile {
  const char* name;
  std::function<std::string()> bytes;
  const char* fragment;
  const char* tensor;
};
void PrintTo(const BadFile& b, std::ostream* os) { *os << b.name; }

// A well-formed two-tensor file: a F32 [2, 2] at [0, 16) and b I8 [8] at [16, 24).
std::string good_image() {
  return image(R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
               R"("b":{"dtype":"I8","shape":[8],"data_offsets":[16,24]}})",
               random_bytes(24));
}
// One tensor "t" with the given fields, followed by `data` bytes.
std::string one(const std::string& fields, size_t data = 16) {
  return image(R"({"t":{)" + fields + "}}", random_bytes(data));
}
std::string nested(char open, char close, size_t depth) { return std::string(depth, open) + std::string(depth, close); }

const BadFile kBadFiles[] = {
    {"empty_file", [] { return std::string(); }, "file is 0 bytes, too short", ""},
    {"truncated_in_length", [] { return good_image().substr(0, 5); }, "file is 5 bytes, too short", ""},
    {"truncated_in_header", [] { return good_image().substr(0, 40); }, "runs past the end of the file", ""},
    {"truncated_in_data", [] { auto s = good_image(); return s.substr(0, s.size() - 3); },
     "reach beyond the data section, which is 21 bytes", "b"},
    {"header_length_2_pow_63", [] { return image("{}", "", uint64_t{1} << 63); }, "exceeds the limit of 100000000", ""},
    {"header_length_just_over_limit", [] { return image("{}", "", 100'000'001); }, "exceeds the limit", ""},
    {"header_length_past_file", [] { return image("{}", "", 1000); }, "header length 1000 runs past the end", ""},
    {"header_not_json", [] { return image("hello, world"); }, "header is not valid JSON", ""},
    {"header_empty", [] { return image(""); }, "header is not valid JSON", ""},
    {"header_json_array", [] { return image("[1,2]"); }, "header is an array, expected a JSON object", ""},
    {"header_json_string", [] { return image("\"x\""); }, "header is a string, expected a JSON object", ""},
    {"header_deeply_nested_array", [] { return image(nested('[', ']', 100000)); }, "header is an array", ""},
    {"header_invalid_utf8", [] { return image("{\"a\xff\":1}"); }, "header is not valid UTF-8 (byte 3", ""},
    {"header_overlong_utf8", [] { return image("{\"\xc0\xaf\":1}"); }, "not valid UTF-8", ""},
    {"header_trailing_garbage", [] { return image("{} x"); }, "header is not valid JSON", ""},
    {"header_nul_padding", [] { return image(std::string("{}\0\0\0\0\0\0", 8)); }, "a NUL byte at byte 2", ""},
    {"header_nul_then_junk", [] { return image(std::string("{}\0junk!", 8)); }, "a NUL byte at byte 2", ""},
    {"missing_dtype", [] { return one(R"("shape":[4],"data_offsets":[0,16])"); }, "missing field \"dtype\"", "t"},
    {"missing_shape", [] { return one(R"("dtype":"F32","data_offsets":[0,16])"); }, "missing field \"shape\"", "t"},
    {"missing_data_offsets", [] { return one(R"("dtype":"F32","shape":[4])"); }, "missing field \"data_offsets\"", "t"},
    {"unknown_dtype", [] { return one(R"("dtype":"F17","shape":[4],"data_offsets":[0,16])"); },
     "unknown dtype \"F17\", expected one of F64, F32", "t"},
    {"foreign_dtype", [] { return one(R"("dtype":"U16","shape":[8],"data_offsets":[0,16])"); },
     "dtype \"U16\" is a safetensors dtype qlora does not read", "t"},
    {"dtype_not_string", [] { return one(R"("dtype":4,"shape":[4],"data_offsets":[0,16])"); },
     "dtype is a number, expected a string", "t"},
    {"unknown_field", [] { return one(R"("dtype":"F32","shape":[4],"data_offsets":[0,16],"x":1)"); },
     "unknown field \"x\"", "t"},
    {"duplicate_field", [] { return one(R"("dtype":"F32","dtype":"F32","shape":[4],"data_offsets":[0,16])"); },
     "field \"dtype\" appears twice", "t"},
    {"negative_dim", [] { return one(R"("dtype":"F32","shape":[-4],"data_offsets":[0,16])"); },
     "shape entry -4 is negative", "t"},
    {"fractional_dim", [] { return one(R"("dtype":"F32","shape":[2.5],"data_offsets":[0,16])"); },
     "shape entry 2.5 is not a non-negative integer", "t"},
    {"dim_above_int64", [] { return one(R"("dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,16])"); },
     "is larger than 2^63 - 1", "t"},
    {"shape_not_array", [] { return one(R"("dtype":"F32","shape":4,"data_offsets":[0,16])"); },
     "shape is a number, expected an array", "t"},
    {"shape_nested_array", [] { return one(R"("dtype":"F32","shape":[[4]],"data_offsets":[0,16])"); },
     "shape holds an array", "t"},
    {"shape_rank_65", [] {
       std::string dims = "1";
       for (int i = 1; i < 65; ++i) dims += ",1";
       return one(R"("dtype":"F32","shape":[)" + dims + R"(],"data_offsets":[0,4])", 4); },
     "more than 64 dimensions", "t"},
    {"shape_product_overflows", [] { return one(R"("dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,16])"); },
     "overflows 64-bit arithmetic", "t"},
    {"shape_claims_terabytes", [] { return one(R"("dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,16])"); },
     "needs 4000000000000 bytes, data_offsets [0, 16] hold 16", "t"},
    {"byte_count_mismatch", [] { return one(R"("dtype":"F32","shape":[2,2],"data_offsets":[0,12])", 12); },
     "byte count mismatch: shape [2, 2] of F32 needs 16 bytes", "t"},
    {"offsets_reversed", [] { return one(R"("dtype":"F32","shape":[4],"data_offsets":[16,0])"); }, "are reversed", "t"},
    {"offsets_three_entries", [] { return one(R"("dtype":"F32","shape":[4],"data_offsets":[0,16,16])"); },
     "more than 2 entries", "t"},
    {"offsets_one_entry", [] { return one(R"("dtype":"F32","shape":[4],"data_offsets":[16])"); },
     "data_offsets has 1 entries, expected [begin, end]", "t"},
    {"offsets_beyond_file", [] { return one(R"("dtype":"F32","shape":[8],"data_offsets":[0,32])"); },
     "reach beyond the data section", "t"},
    {"offsets_huge", [] { return one(R"("dtype":"F32","shape":[4],"data_offsets":[18446744073709551600,18446744073709551615])"); },
     "reach beyond the data section", "t"},
    {"offsets_overlap", [] {
       return image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                    R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})", random_bytes(24)); },
     "data_offsets overlap tensor \"a\"", "b"},
    {"offsets_hole", [] {
       return image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                    R"("b":{"dtype":"F32","shape":[4],"data_offsets":[24,40]}})", random_bytes(40)); },
     "hole of 8 bytes before this tensor", "b"},
    {"offsets_not_from_zero", [] { return one(R"("dtype":"F32","shape":[4],"data_offsets":[8,24])", 24); },
     "the start of the data", "t"},
    {"trailing_bytes", [] { return one(R"("dtype":"F32","shape":[4],"data_offsets":[0,16])", 24); },
     "8 trailing bytes after the last tensor", ""},
    {"duplicate_names", [] {
       return image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                    R"("a":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}})", random_bytes(32)); },
     "appears twice in the header (duplicate name)", "a"},
    {"empty_name", [] { return image(R"({"":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", random_bytes(16)); },
     "a tensor has an empty name", ""},
    {"control_char_name", [] { return image(R"({"a\u0001b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", random_bytes(16)); },
     "name contains a control character", "a\\x01b"},
    {"nul_in_name", [] { return image(R"({"a\u0000":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", random_bytes(16)); },
     "name contains a control character", "a\\x00"},
    {"entry_not_object", [] { return image(R"({"t":5})"); }, "entry is a number, expected an object", "t"},
    {"metadata_value_not_string", [] { return image(R"({"__metadata__":{"format":1}})"); },
     "\"__metadata__\" value of \"format\" is a number, expected a string", ""},
    {"metadata_wrong_type", [] { return image(R"({"__metadata__":["pt"]})"); },
     "\"__metadata__\" is an array, expected an object of string to string", ""},
    {"metadata_nested_object", [] { return image(R"({"__metadata__":{"a":{"b":"c"}}})"); },
     "\"__metadata__\" value of \"a\" is an object", ""},
    {"metadata_twice", [] { return image(R"({"__metadata__":{},"__metadata__":{}})"); }, "\"__metadata__\" appears twice", ""},
    {"metadata_duplicate_key", [] { return image(R"({"__metadata__":{"a":"1","a":"2"}})"); },
     "has the key \"a\" twice", ""},
};

class BadSafetensors : public ::testing::TestWithParam<BadFile> {};

TEST_P(BadSafetensors, RefusedWithNamedError) {
  const BadFile& bad = GetParam();
  const std::string bytes = bad.bytes();
  const std::string path = make_temp_dir("io-bad") + "/" + bad.name + ".safetensors";
  spit(path, bytes);
  if (const char* seeds = std::getenv("QLORA_IO_SEED_DIR")) {  // scripts/fuzz.sh: seed corpus
    spit(std::string(seeds) + "/bad_" + bad.name + ".safetensors", bytes);
  }
  try {
    SafetensorsFile::open(path);
    FAIL() << "accepted a bad file";
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(path + ": ", 0), 0u) << "message must start with the path: " << msg;
    EXPECT_NE(msg.find(bad.fragment), std::string::npos) << "missing \"" << bad.fragment << "\" in: " << msg;
    if (*bad.tensor) {
      EXPECT_NE(msg.find(std::string("tensor \"") + bad.tensor + "\""), std::string::npos) << msg;
    }
    EXPECT_NE(msg.find("re-save it"), std::string::npos) << "no advice in: " << msg;
    EXPECT_LT(msg.size(), 1000u) << "message too long";
  }
  // The in-memory parser on an exact-size heap copy (as the fuzzer runs it): same verdict.
  std::vector<uint8_t> heap(bytes.begin(), bytes.end());
  EXPECT_THROW(detail::parse_safetensors(heap.data(), heap.size(), bad.name), InputError);
}

INSTANTIATE_TEST_SUITE_P(Corpus, BadSafetensors, ::testing::ValuesIn(kBadFiles),
                         [](const ::testing::TestParamInfo<BadFile>& i) { return std::string(i.param.name); });

TEST(BadSafetensorsSweep, EveryTruncationOfAGoodFileIsRefused) {
  const std::string good = slurp(source_path(kGood));
  for (size_t n = 0; n < good.size(); ++n) {
    std::vector<uint8_t> cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_THROW(detail::parse_safetensors(cut.data(), cut.size(), "cut"), InputError) << "length " << n;
  }
}

// Every header byte replaced by a few values: accepted or InputError, nothing else.
TEST(BadSafetensorsSweep, EveryHeaderByteCorruptedIsHandled) {
  const std::string good = slurp(source_path(kGood));
  const uint64_t header_end = SafetensorsFile::open(source_path(kGood))->data_offset();
  size_t refused = 0, tried = 0;
  for (size_t i = 0; i < header_end; ++i) {
    for (uint8_t v : {uint8_t{0x00}, uint8_t{0xff}, uint8_t{'9'}, uint8_t{'"'}}) {
      std::vector<uint8_t> b(good.begin(), good.end());
      if (b[i] == v) continue;
      b[i] = v;
      ++tried;
      try {
        detail::parse_safetensors(b.data(), b.size(), "flip");
      } catch (const InputError&) {
        ++refused;
      }
    }
  }
  EXPECT_GT(refused, tried / 2) << "most single-byte corruptions must be detected";
}

}  // namespace
}  // namespace qlora::io
