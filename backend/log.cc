#include "backend/log.h"

#include <syslog.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <algorithm>
#include <cstring>

namespace deferfs {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kWarn)};
std::atomic<bool> g_syslog{false};

constexpr int kSyslogPriority[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};

void Emit(LogLevel level, const char* fmt, va_list ap) {
  if (!LogEnabled(level)) return;
  if (g_syslog.load(std::memory_order_acquire)) {
    vsyslog(kSyslogPriority[static_cast<int>(level)], fmt, ap);
    return;
  }
  // One fputs of a fully formatted line: stdio locks the stream per call, so
  // lines from concurrent threads never interleave.
  char line[1024];
  int n = snprintf(line, sizeof(line), "deferfs: ");
  int m = vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
  size_t len = m < 0 ? n : std::min(sizeof(line) - 2, static_cast<size_t>(n + m));
  if (len > 0 && line[len - 1] == '\n') len--;
  line[len] = '\n';
  line[len + 1] = '\0';
  fputs(line, stderr);
}

}  // namespace

void LogInit(LogLevel level, bool use_syslog) {
  g_level.store(static_cast<int>(level), std::memory_order_relaxed);
  if (use_syslog) {
    openlog("deferfs", LOG_PID | LOG_NDELAY, LOG_DAEMON);
    setlogmask(LOG_UPTO(kSyslogPriority[static_cast<int>(level)]));
  }
  g_syslog.store(use_syslog, std::memory_order_release);
}

bool ParseLogLevel(const char* name, LogLevel* level) {
  for (LogLevel l : {LogLevel::kError, LogLevel::kWarn, LogLevel::kInfo, LogLevel::kDebug}) {
    if (strcmp(name, LogLevelName(l)) == 0) {
      *level = l;
      return true;
    }
  }
  return false;
}

const char* LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kError: return "error";
    case LogLevel::kWarn: return "warn";
    case LogLevel::kInfo: return "info";
    case LogLevel::kDebug: return "debug";
  }
  return "?";
}

bool LogEnabled(LogLevel level) {
  return static_cast<int>(level) <= g_level.load(std::memory_order_relaxed);
}

#define DEFERFS_DEFINE_LOG(name, lvl) \
  void name(const char* fmt, ...) {   \
    va_list ap;                       \
    va_start(ap, fmt);                \
    Emit(lvl, fmt, ap);               \
    va_end(ap);                       \
  }

DEFERFS_DEFINE_LOG(LogError, LogLevel::kError)
DEFERFS_DEFINE_LOG(LogWarn, LogLevel::kWarn)
DEFERFS_DEFINE_LOG(LogInfo, LogLevel::kInfo)
DEFERFS_DEFINE_LOG(LogDebug, LogLevel::kDebug)

#undef DEFERFS_DEFINE_LOG

}  // namespace deferfs
