// Note [fmt versions]: spdlog (Debian 1.10 / Ubuntu 1.12) compiles against the
// system fmt 9, while LibTorch puts its own fmt 12 on the include path of every
// target that links it. This file is the only one that sees spdlog, and its
// target (qlora_log) does not link torch, so the two never meet.
#include "qlora/common/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace qlora::log {
namespace {

spdlog::logger& logger() {
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto l = spdlog::stderr_color_mt("qlora");
    l->set_pattern("%^[%H:%M:%S %l]%$ %v");
    l->set_level(spdlog::level::info);
    return l;
  }();
  return *instance;
}

spdlog::level::level_enum to_spdlog(Level level) {
  switch (level) {
    case Level::kDebug: return spdlog::level::debug;
    case Level::kInfo: return spdlog::level::info;
    case Level::kWarn: return spdlog::level::warn;
    case Level::kError: return spdlog::level::err;
    case Level::kOff: return spdlog::level::off;
  }
  return spdlog::level::info;
}

}  // namespace

void set_level(Level level) { logger().set_level(to_spdlog(level)); }

Level level() {
  switch (logger().level()) {
    case spdlog::level::trace:
    case spdlog::level::debug: return Level::kDebug;
    case spdlog::level::info: return Level::kInfo;
    case spdlog::level::warn: return Level::kWarn;
    case spdlog::level::err:
    case spdlog::level::critical: return Level::kError;
    default: return Level::kOff;
  }
}

void debug(std::string_view msg) { logger().debug("{}", msg); }
void info(std::string_view msg) { logger().info("{}", msg); }
void warn(std::string_view msg) { logger().warn("{}", msg); }
void error(std::string_view msg) { logger().error("{}", msg); }

}  // namespace qlora::log
