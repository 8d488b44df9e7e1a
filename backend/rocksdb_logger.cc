#include "backend/rocksdb_logger.h"

#include <rocksdb/env.h>

#include <cstdarg>
#include <cstdio>

#include "backend/log.h"

namespace deferfs {
namespace {

class RocksLogger : public rocksdb::Logger {
 public:
  // Level filtering is ours (LogEnabled): let every message through to Logv.
  RocksLogger() : rocksdb::Logger(rocksdb::DEBUG_LEVEL) {}

  void Logv(const char* format, va_list ap) override { Emit(LogLevel::kDebug, format, ap); }
  void Logv(const rocksdb::InfoLogLevel level, const char* format, va_list ap) override {
    Emit(level >= rocksdb::FATAL_LEVEL ? LogLevel::kWarn : LogLevel::kDebug, format, ap);
  }

 private:
  static void Emit(LogLevel level, const char* format, va_list ap) {
    if (!LogEnabled(level)) return;
    char line[512];
    std::vsnprintf(line, sizeof(line), format, ap);
    if (level == LogLevel::kWarn) {
      LogWarn("rocksdb: %s", line);
    } else {
      LogDebug("rocksdb: %s", line);
    }
  }
};

}  // namespace

std::shared_ptr<rocksdb::Logger> NewRocksLogger() { return std::make_shared<RocksLogger>(); }

}  // namespace deferfs
