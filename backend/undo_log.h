// UndoLog: the device's volatile write cache made visible, for crash tests.
// A device may lose, at a power cut, every write that neither a flush nor FUA
// has made durable; a SIGKILLed daemon loses none (the backing file keeps
// them), so a crash test alone cannot tell whether a flush was missing. With
// the mount option `undo_log=PATH`, every write records the prior contents of
// its blocks before it reaches the device, and every flush and every completed
// FUA write records what it made durable; the metadata store records the
// files it creates and how much of each every sync covered. After the crash,
// RollBackUnflushedWrites returns each block to what it held at its last
// durable point and cuts each of those files back to its last sync: the
// worst a power cut may do. Thread-safe: appends are under one mutex.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "backend/status.h"
#include "backend/unique_fd.h"

namespace deferfs {

class UndoLog {
 public:
  // A new log at `path` (truncated: one per mount) for the device open at
  // `dev_fd` (O_DIRECT; every IO `dio_align`-aligned). `dev_fd` must outlive
  // the UndoLog. The log grows by the size of every write.
  static Status Create(const std::string& path, int dev_fd, uint32_t dio_align, std::unique_ptr<UndoLog>* out);

  // Before a write of [off, off + len) is submitted: logs the blocks' contents
  // (one synchronous read of the device); *seq names the write for Completed.
  Status BeforeWrite(uint64_t off, uint32_t len, uint64_t* seq);
  // The write `seq` completed in full; with `fua`, it is durable already.
  void Completed(uint64_t seq, bool fua);
  // A flush covers the writes that completed before FlushStarts();
  // Flushed(mark) says it completed. Writes still in flight are not covered.
  uint64_t FlushStarts();
  void Flushed(uint64_t mark);
  // A file (of the metadata store) created empty, and the length of it a
  // completed sync made durable.
  void FileCreated(const std::string& path);
  void FileSynced(const std::string& path, uint64_t size);

 private:
  class Key {
    friend class UndoLog;
    Key() = default;
  };

 public:
  UndoLog(Key, UniqueFd log_fd, int dev_fd, uint32_t dio_align);

 private:
  // Appends one record; returns its seq, or 0 if it could not be written.
  uint64_t Append(uint8_t type, uint64_t off, uint32_t len, uint64_t covers, const void* data, bool fua = false);

  const UniqueFd log_fd_;  // O_APPEND
  const int dev_fd_;
  const uint32_t dio_align_;
  std::mutex mu_;
  uint64_t next_seq_ = 1;  // guarded by mu_: the order of records
};

// What a power cut leaves of the metadata store's files: what no sync covered
// may be lost, or the page cache may have written all of it back before the
// cut (the case the data barrier is for). Both happen.
enum class UnsyncedFiles { kLost, kWrittenBack };

struct RolledBack {
  uint64_t device_bytes = 0;  // restored to their contents at the last durable point
  uint64_t file_bytes = 0;    // cut from the metadata store's files
};

// Restores, in the device or file at `device_path`, every block that a write
// logged in `log_path` changed after the block's last durable point; with
// kLost, also cuts every file the log saw created back to its last sync (a
// file since removed is left so). A torn last record (the daemon killed
// while logging) is ignored: what it announced had not happened yet. The
// log is read whole before anything changes.
Status RollBackUnflushedWrites(const std::string& log_path, const std::string& device_path, UnsyncedFiles files,
                               RolledBack* out);

}  // namespace deferfs
