// Log: leveled diagnostics of the daemon, to stderr ("deferfs: <msg>") or to
// syslog (ident "deferfs", LOG_DAEMON). Thread-safe; usable before LogInit.
#pragma once

namespace deferfs {

enum class LogLevel { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3 };

// Until LogInit runs, messages at warn and above go to stderr.
// Call once, early, before threads start logging; later calls replace the
// settings (safe, but messages racing the switch may take either path).
void LogInit(LogLevel level, bool use_syslog);

// Parses "error" | "warn" | "info" | "debug"; false if `name` is none.
bool ParseLogLevel(const char* name, LogLevel* level);
const char* LogLevelName(LogLevel level);

// True if a message at `level` would be emitted (skip costly formatting).
bool LogEnabled(LogLevel level);

void LogError(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void LogWarn(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void LogInfo(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void LogDebug(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace deferfs
