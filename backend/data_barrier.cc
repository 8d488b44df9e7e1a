#include "backend/data_barrier.h"

#include <rocksdb/file_system.h>

#include <atomic>
#include <utility>

#include "backend/undo_log.h"

namespace deferfs {

void DataBarrier::SetFlush(std::function<Status()> flush_device) {
  std::lock_guard l(mu_);
  flush_ = std::move(flush_device);
}

Status DataBarrier::Pass() {
  std::lock_guard l(mu_);
  // Under mu_: a disarmed barrier seen here was disarmed by a flush that has
  // completed, so whatever armed before it is on stable media.
  if (!armed_.load(std::memory_order_seq_cst)) return Status::Ok();
  return FlushLocked();
}

Status DataBarrier::Flush() {
  std::lock_guard l(mu_);
  return FlushLocked();
}

Status DataBarrier::FlushLocked() {
  // Disarm before flushing: a commit armed after this point may reference
  // data the flush misses, so it re-arms for the next Pass().
  armed_.store(false, std::memory_order_seq_cst);
  if (!flush_) return Status::Ok();
  Status st = flush_();
  if (!st.ok()) {
    armed_.store(true, std::memory_order_seq_cst);  // still owed
    return st;
  }
  flushes_.fetch_add(1, std::memory_order_relaxed);
  return Status::Ok();
}

namespace {

rocksdb::IOStatus ToIo(const Status& st) {
  if (st.ok()) return rocksdb::IOStatus::OK();
  return rocksdb::IOStatus::IOError("data barrier: " + st.message());
}

// With an undo log (testing only), a file this wrapper created is logged, and
// so is the length each of its syncs made durable.
class OrderedWritableFile : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  // `created`: a new, empty file; else one reopened with what it holds.
  OrderedWritableFile(std::unique_ptr<rocksdb::FSWritableFile> f, std::shared_ptr<DataBarrier> barrier,
                      UndoLog* undo_log, std::string path, bool created)
      : FSWritableFileOwnerWrapper(std::move(f)), barrier_(std::move(barrier)), undo_log_(undo_log),
        path_(std::move(path)) {
    if (!undo_log_) return;
    if (created) {
      undo_log_->FileCreated(path_);
    } else {
      size_.store(target()->GetFileSize(rocksdb::IOOptions(), nullptr), std::memory_order_relaxed);
    }
  }

  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o,
                           rocksdb::IODebugContext* dbg) override {
    rocksdb::IOStatus s = ToIo(barrier_->Pass());
    if (s.ok()) s = target()->Append(data, o, dbg);
    if (s.ok() && undo_log_) size_.fetch_add(data.size(), std::memory_order_relaxed);
    return s;
  }
  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o,
                           const rocksdb::DataVerificationInfo& v, rocksdb::IODebugContext* dbg) override {
    rocksdb::IOStatus s = ToIo(barrier_->Pass());
    if (s.ok()) s = target()->Append(data, o, v, dbg);
    if (s.ok() && undo_log_) size_.fetch_add(data.size(), std::memory_order_relaxed);
    return s;
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t off, const rocksdb::IOOptions& o,
                                     rocksdb::IODebugContext* dbg) override {
    rocksdb::IOStatus s = ToIo(barrier_->Pass());
    if (s.ok()) s = target()->PositionedAppend(data, off, o, dbg);
    if (s.ok() && undo_log_) Grow(off + data.size());
    return s;
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t off, const rocksdb::IOOptions& o,
                                     const rocksdb::DataVerificationInfo& v, rocksdb::IODebugContext* dbg) override {
    rocksdb::IOStatus s = ToIo(barrier_->Pass());
    if (s.ok()) s = target()->PositionedAppend(data, off, o, v, dbg);
    if (s.ok() && undo_log_) Grow(off + data.size());
    return s;
  }
  // A sync covers what was appended before it began (RocksDB syncs a WAL
  // while another thread may append to it).
  rocksdb::IOStatus Sync(const rocksdb::IOOptions& o, rocksdb::IODebugContext* dbg) override {
    const uint64_t covered = size_.load(std::memory_order_relaxed);
    return Synced(target()->Sync(o, dbg), covered);
  }
  rocksdb::IOStatus Fsync(const rocksdb::IOOptions& o, rocksdb::IODebugContext* dbg) override {
    const uint64_t covered = size_.load(std::memory_order_relaxed);
    return Synced(target()->Fsync(o, dbg), covered);
  }

 private:
  rocksdb::IOStatus Synced(rocksdb::IOStatus s, uint64_t covered) {
    if (s.ok() && undo_log_) undo_log_->FileSynced(path_, covered);
    return s;
  }
  void Grow(uint64_t end) {
    uint64_t cur = size_.load(std::memory_order_relaxed);
    while (cur < end && !size_.compare_exchange_weak(cur, end, std::memory_order_relaxed)) {
    }
  }

  std::shared_ptr<DataBarrier> barrier_;
  UndoLog* const undo_log_;
  const std::string path_;
  std::atomic<uint64_t> size_{0};  // bytes appended; counted only with an undo log
};

class OrderedFileSystem : public rocksdb::FileSystemWrapper {
 public:
  OrderedFileSystem(std::shared_ptr<DataBarrier> barrier, UndoLog* undo_log)
      : FileSystemWrapper(rocksdb::FileSystem::Default()), barrier_(std::move(barrier)), undo_log_(undo_log) {}

  const char* Name() const override { return "DeferfsOrderedFileSystem"; }

  rocksdb::IOStatus NewWritableFile(const std::string& f, const rocksdb::FileOptions& fo,
                                    std::unique_ptr<rocksdb::FSWritableFile>* r,
                                    rocksdb::IODebugContext* dbg) override {
    return Wrap(target()->NewWritableFile(f, fo, r, dbg), f, /*created=*/true, r);
  }
  rocksdb::IOStatus ReopenWritableFile(const std::string& f, const rocksdb::FileOptions& fo,
                                       std::unique_ptr<rocksdb::FSWritableFile>* r,
                                       rocksdb::IODebugContext* dbg) override {
    return Wrap(target()->ReopenWritableFile(f, fo, r, dbg), f, /*created=*/false, r);
  }
  rocksdb::IOStatus ReuseWritableFile(const std::string& f, const std::string& old,
                                      const rocksdb::FileOptions& fo, std::unique_ptr<rocksdb::FSWritableFile>* r,
                                      rocksdb::IODebugContext* dbg) override {
    return Wrap(target()->ReuseWritableFile(f, old, fo, r, dbg), f, /*created=*/true, r);
  }

 private:
  rocksdb::IOStatus Wrap(rocksdb::IOStatus s, const std::string& f, bool created,
                         std::unique_ptr<rocksdb::FSWritableFile>* r) {
    if (s.ok()) *r = std::make_unique<OrderedWritableFile>(std::move(*r), barrier_, undo_log_, f, created);
    return s;
  }

  std::shared_ptr<DataBarrier> barrier_;
  UndoLog* const undo_log_;
};

}  // namespace

std::shared_ptr<rocksdb::FileSystem> NewOrderedFileSystem(std::shared_ptr<DataBarrier> barrier, UndoLog* undo_log) {
  return std::make_shared<OrderedFileSystem>(std::move(barrier), undo_log);
}

}  // namespace deferfs
