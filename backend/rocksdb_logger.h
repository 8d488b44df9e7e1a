// RocksDB's info log, routed to the daemon's log (backend/log.h) instead of
// a LOG file in the metadata directory: a full or failing metadata
// filesystem must not take the logger down with it (RocksDB 7.8 asserts when
// it writes again to a log file that once failed). Thread-safe.
#pragma once

#include <memory>

namespace rocksdb {
class Logger;
}  // namespace rocksdb

namespace deferfs {

// RocksDB's messages go out at debug level (fatal ones at warn): they only
// explain a failure that deferfs itself reports.
std::shared_ptr<rocksdb::Logger> NewRocksLogger();

}  // namespace deferfs
