#include "backend/data_barrier.h"

#include <rocksdb/file_system.h>

#include <utility>

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

class OrderedWritableFile : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  OrderedWritableFile(std::unique_ptr<rocksdb::FSWritableFile> f, std::shared_ptr<DataBarrier> barrier)
      : FSWritableFileOwnerWrapper(std::move(f)), barrier_(std::move(barrier)) {}

  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o,
                           rocksdb::IODebugContext* dbg) override {
    rocksdb::IOStatus s = ToIo(barrier_->Pass());
    return s.ok() ? target()->Append(data, o, dbg) : s;
  }
  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o,
                           const rocksdb::DataVerificationInfo& v, rocksdb::IODebugContext* dbg) override {
    rocksdb::IOStatus s = ToIo(barrier_->Pass());
    return s.ok() ? target()->Append(data, o, v, dbg) : s;
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t off, const rocksdb::IOOptions& o,
                                     rocksdb::IODebugContext* dbg) override {
    rocksdb::IOStatus s = ToIo(barrier_->Pass());
    return s.ok() ? target()->PositionedAppend(data, off, o, dbg) : s;
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t off, const rocksdb::IOOptions& o,
                                     const rocksdb::DataVerificationInfo& v, rocksdb::IODebugContext* dbg) override {
    rocksdb::IOStatus s = ToIo(barrier_->Pass());
    return s.ok() ? target()->PositionedAppend(data, off, o, v, dbg) : s;
  }

 private:
  std::shared_ptr<DataBarrier> barrier_;
};

class OrderedFileSystem : public rocksdb::FileSystemWrapper {
 public:
  explicit OrderedFileSystem(std::shared_ptr<DataBarrier> barrier)
      : FileSystemWrapper(rocksdb::FileSystem::Default()), barrier_(std::move(barrier)) {}

  const char* Name() const override { return "DeferfsOrderedFileSystem"; }

  rocksdb::IOStatus NewWritableFile(const std::string& f, const rocksdb::FileOptions& fo,
                                    std::unique_ptr<rocksdb::FSWritableFile>* r,
                                    rocksdb::IODebugContext* dbg) override {
    return Wrap(target()->NewWritableFile(f, fo, r, dbg), r);
  }
  rocksdb::IOStatus ReopenWritableFile(const std::string& f, const rocksdb::FileOptions& fo,
                                       std::unique_ptr<rocksdb::FSWritableFile>* r,
                                       rocksdb::IODebugContext* dbg) override {
    return Wrap(target()->ReopenWritableFile(f, fo, r, dbg), r);
  }
  rocksdb::IOStatus ReuseWritableFile(const std::string& f, const std::string& old,
                                      const rocksdb::FileOptions& fo, std::unique_ptr<rocksdb::FSWritableFile>* r,
                                      rocksdb::IODebugContext* dbg) override {
    return Wrap(target()->ReuseWritableFile(f, old, fo, r, dbg), r);
  }

 private:
  rocksdb::IOStatus Wrap(rocksdb::IOStatus s, std::unique_ptr<rocksdb::FSWritableFile>* r) {
    if (s.ok()) *r = std::make_unique<OrderedWritableFile>(std::move(*r), barrier_);
    return s;
  }

  std::shared_ptr<DataBarrier> barrier_;
};

}  // namespace

std::shared_ptr<rocksdb::FileSystem> NewOrderedFileSystem(std::shared_ptr<DataBarrier> barrier) {
  return std::make_shared<OrderedFileSystem>(std::move(barrier));
}

}  // namespace deferfs
