// Typed errors shared by every module. Deep code throws; src/main.cpp catches
// once and maps the type to the process exit code:
//   InputError   -> 2  (the user's input is wrong: config, file, flag; fixable by them)
//   anything else -> 1 (a runtime failure)
// A message says what was expected, what was found, and what to do instead.
#pragma once

#include <stdexcept>
#include <string>

namespace qlora {

inline constexpr int kExitOk = 0;
inline constexpr int kExitRuntimeFailure = 1;
inline constexpr int kExitBadInput = 2;
inline constexpr int kExitInterrupted = 130;  // stopped by a signal after saving a checkpoint (128 + SIGINT)

// Bad user input: a config key, a flag value, a missing or malformed file.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace qlora
