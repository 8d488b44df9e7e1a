// The direct-IO engine: the userspace twin of Linux fs/iomap/direct-io.c.
// iomap_dio_rw() maps a request with IomapOps, builds one bio per mapping,
// hands the bios to a poller and returns kIocbQueued (or the result, when
// nothing was left in flight). A Dio holds one reference per bio plus one for
// submission; whoever drops the last calls iomap_dio_done(), the one place
// that decides who runs the completion (DESIGN.md, "Kiocb and the completion
// decision"). Completions that a thread runs back to back (task_work, a
// completion thread) share one metadata commit per inode (DioBatch, dio.cc).
// Thread-safe: any worker may submit; completions run anywhere.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "backend/bio.h"
#include "backend/poller.h"
#include "fs/completion_mode.h"
#include "fs/iomap.h"
#include "fs/kiocb.h"
#include "fs/latency.h"
#include "fs/task_work.h"
#include "fs/workqueue.h"

namespace deferfs {

// Where completions ran; the counters `deferfs stats` shows.
struct DioStats {
  std::atomic<uint64_t> reads{0};
  std::atomic<uint64_t> writes{0};
  std::atomic<uint64_t> completed_inline{0};     // in the poller (reads; inline/auto writes)
  std::atomic<uint64_t> completed_deferred{0};   // by the issuer, through dio_complete
  std::atomic<uint64_t> completed_workqueue{0};  // on a completion thread
  std::atomic<uint64_t> completed_sync{0};       // by the issuer that waited
  std::atomic<uint64_t> completed_at_submit{0};  // by the submitter: nothing left in flight when it finished submitting
  std::atomic<uint64_t> pure_overwrites{0};
  std::atomic<uint64_t> errors{0};
  std::atomic<int64_t> inflight{0};  // dios submitted and not yet completed

  // Submit -> last bio done ("device"), and submit -> reply (recorded by the issuer).
  LatencyHistogram read_device, write_device, read_reply, write_reply;
};

struct Dio {
  enum : uint32_t {
    DIO_WRITE = 1u << 0,
    DIO_NEED_CONVERT = 1u << 1,  // wrote unwritten or NEW blocks
    DIO_EXTENDING = 1u << 2,     // ends past i_size
    DIO_DSYNC = 1u << 3,
    DIO_NEED_SYNC = 1u << 4,  // O_DSYNC over metadata not yet durable: sync it at completion
  };

  Kiocb* iocb = nullptr;
  Inode* inode = nullptr;
  class DioEngine* engine = nullptr;
  uint32_t flags = 0;
  uint64_t pos = 0;
  size_t size = 0;  // bytes the request transfers (reads: clamped to i_size)
  uint64_t isize = 0;  // writes: i_size once it completes, if DIO_EXTENDING
  std::atomic<int> ref{1};
  std::atomic<int> error{0};  // first -errno from a bio
  int64_t start_ns = 0;       // MonotonicNs() at submission

  // Sync DIO: the submitter sleeps until the last bio ends.
  bool wait_for_completion = false;
  TaskWork* submitter = nullptr;
  std::atomic<bool> done{false};

  std::vector<Bio> bios;
  std::vector<uint64_t> new_lblks;  // keys in Inode::new_extents this dio allocated
  WorkItem work;  // for the completion thread

  // A write that needs none of the filesystem's completion work. O_DSYNC
  // data goes write-through (FUA bios), so only its metadata needs work.
  bool pure_overwrite() const { return (flags & (DIO_NEED_CONVERT | DIO_EXTENDING | DIO_NEED_SYNC)) == 0; }
};

class DioEngine {
 public:
  // The filesystem's write end_io (xfs_dio_write_end_io's role) for one or
  // more finished writes to one inode: convert unwritten blocks, commit NEW
  // allocations or free them on error, set the new size, all in one
  // metadata batch; flush for DSYNC. 0 or -errno, for all of them.
  using EndIo = std::function<int(std::span<Dio* const> dios)>;

  DioEngine(CompletionMode mode, std::vector<Poller*> pollers, Workqueue* wq, IomapOps* iomap, EndIo end_io);

  // iomap_dio_rw: `buf` is dio-aligned, inside registered buffer `buf_index`
  // (or -1). pos and len are block-aligned. An iocb without ki_complete is
  // synchronous: the call returns the result. Otherwise kIocbQueued means
  // ki_complete will be called; any other value is the result, now.
  ssize_t iomap_dio_rw(Kiocb* iocb, uint8_t* buf, int buf_index, size_t len);

  DioStats& stats() { return stats_; }

 private:
  static void iomap_dio_bio_end_io(Bio* bio);
  static ssize_t iomap_dio_deferred_complete(void* data);
  static void iomap_dio_complete_work(WorkItem* work);
  void iomap_dio_done(Dio* dio);
  ssize_t iomap_dio_complete(Dio* dio);
  // An async completion's work: kIocbQueued if it joined the thread's batch.
  ssize_t iomap_dio_complete_async(Dio* dio);
  ssize_t iomap_dio_finish(Dio* dio, int end_io_ret);
  friend class DioBatch;
  Poller* PickPoller();

  const CompletionMode mode_;
  const std::vector<Poller*> pollers_;
  Workqueue* const wq_;
  IomapOps* const iomap_;
  const EndIo end_io_;
  DioStats stats_;
};

}  // namespace deferfs
