#include "data/onig_regex.h"

#include <oniguruma.h>

#include <mutex>

#include "qlora/common/errors.h"

namespace qlora::data {
namespace {

std::once_flag g_onig_init;

std::string onig_error(int code, OnigErrorInfo* info) {
  OnigUChar buf[ONIG_MAX_ERROR_MESSAGE_LEN];
  const int n = info != nullptr ? onig_error_code_to_str(buf, code, info) : onig_error_code_to_str(buf, code);
  return std::string(reinterpret_cast<const char*>(buf), n > 0 ? static_cast<size_t>(n) : 0);
}

size_t utf8_len(unsigned char lead) { return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4; }

}  // namespace

struct OnigRegex::Impl {
  regex_t* re = nullptr;
  OnigRegion* region = nullptr;  // one a search; guarded for searches from several threads
  std::mutex mu;
};

OnigRegex::OnigRegex(const std::string& pattern, const std::string& where)
    : pattern_(pattern), impl_(std::make_unique<Impl>()) {
  std::call_once(g_onig_init, [] {
    OnigEncoding enc = ONIG_ENCODING_UTF8;
    onig_initialize(&enc, 1);
  });
  OnigErrorInfo info;
  const auto* p = reinterpret_cast<const OnigUChar*>(pattern.data());
  const int rc = onig_new(&impl_->re, p, p + pattern.size(), ONIG_OPTION_NONE, ONIG_ENCODING_UTF8,
                          ONIG_SYNTAX_ONIGURUMA, &info);
  if (rc != ONIG_NORMAL)
    throw InputError(where + ": the regex " + pattern + " does not compile: " + onig_error(rc, &info));
  impl_->region = onig_region_new();
}

OnigRegex::~OnigRegex() {
  if (impl_->region != nullptr) onig_region_free(impl_->region, 1);
  if (impl_->re != nullptr) onig_free(impl_->re);
}

std::string OnigRegex::escape(std::string_view literal) {
  // The characters Rust's regex::escape escapes (what tokenizers calls on a String pattern).
  static constexpr std::string_view kMeta = "\\.+*?()|[]{}^$#&-~";
  std::string out;
  for (char c : literal) {
    if (kMeta.find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

// Note [regex pieces]
// tokenizers' Split runs find_iter of the onig crate and lays the gaps between matches
// beside them. Each search starts where the previous match ended and sees the whole text
// (look-behind reaches back). An empty match is dropped when it sits right where the
// previous match ended: the search then moves one character on and tries again. An empty
// match anywhere else is kept, as a zero-length match piece.
std::vector<RegexPiece> OnigRegex::pieces(std::string_view text) const {
  std::vector<RegexPiece> out;
  if (text.empty()) {
    out.push_back({0, 0, false});
    return out;
  }
  const auto* str = reinterpret_cast<const OnigUChar*>(text.data());
  const OnigUChar* end = str + text.size();
  std::lock_guard<std::mutex> lock(impl_->mu);
  size_t prev = 0;      // end of the last piece emitted
  size_t from = 0;      // where the next search starts
  long last_end = -1;   // end of the last match kept
  while (from <= text.size()) {
    const int r = onig_search(impl_->re, str, end, str + from, end, impl_->region, ONIG_OPTION_NONE);
    if (r == ONIG_MISMATCH) break;
    if (r < 0) throw InputError("the regex " + pattern_ + " failed on a text: " + onig_error(r, nullptr));
    const auto b = static_cast<size_t>(impl_->region->beg[0]);
    const auto e = static_cast<size_t>(impl_->region->end[0]);
    if (b == e && static_cast<long>(b) == last_end) {
      if (b >= text.size()) break;
      from = b + utf8_len(static_cast<unsigned char>(text[b]));
      continue;
    }
    if (b > prev) out.push_back({prev, b, false});
    out.push_back({b, e, true});
    prev = e;
    last_end = static_cast<long>(e);
    from = e;
  }
  if (prev < text.size()) out.push_back({prev, text.size(), false});
  return out;
}

}  // namespace qlora::data
