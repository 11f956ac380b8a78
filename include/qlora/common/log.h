// log: the project's logger. Messages are formatted by the caller (no fmt or
// spdlog types here, see Note [fmt versions] in src/log/log.cpp) and written
// to stderr with a level prefix; rank-aware filtering arrives with dist.
#pragma once

#include <string_view>

namespace qlora::log {

enum class Level { kDebug, kInfo, kWarn, kError, kOff };

void set_level(Level level);
Level level();

void debug(std::string_view msg);
void info(std::string_view msg);
void warn(std::string_view msg);
void error(std::string_view msg);

}  // namespace qlora::log
