// DataBarrier: the ordering point between data and the metadata that makes it
// visible ("data=ordered"). A commit that may reference freshly written blocks
// Arm()s the barrier before it enters the store; before any metadata byte is
// handed to the OS (WAL write-out, table file, manifest) the store calls
// Pass(), which flushes the backing device's volatile cache if armed. So no
// record can reach stable storage ahead of the data it points at, whatever
// the page cache of the metadata's filesystem writes back, and when.
// Thread-safe.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>

#include "backend/status.h"

namespace rocksdb {
class FileSystem;
}  // namespace rocksdb

namespace deferfs {

class UndoLog;

class DataBarrier {
 public:
  // Until SetFlush, Pass() only disarms: there is no data to order (mkfs, fsck).
  void SetFlush(std::function<Status()> flush_device);
  // Called before a commit that may make completed data writes reachable.
  void Arm() { armed_.store(true, std::memory_order_seq_cst); }
  // Flushes the device if armed. Returns only once every commit armed before
  // the call is covered by a completed flush (its own or an earlier one).
  Status Pass();
  // Flushes the device whether armed or not (fsync of pure overwrites).
  Status Flush();

  uint64_t flushes() const { return flushes_.load(std::memory_order_relaxed); }

 private:
  Status FlushLocked();

  std::atomic<bool> armed_{false};
  std::atomic<uint64_t> flushes_{0};
  std::mutex mu_;  // held across each flush: disarmed under mu_ means flushed
  std::function<Status()> flush_;  // guarded by mu_
};

// A RocksDB file system that forwards everything to the default one and calls
// barrier->Pass() before every write to a writable file (WAL, SST, MANIFEST).
// With `undo_log` (testing only) it logs the files it creates and their syncs.
std::shared_ptr<rocksdb::FileSystem> NewOrderedFileSystem(std::shared_ptr<DataBarrier> barrier,
                                                          UndoLog* undo_log = nullptr);

}  // namespace deferfs
