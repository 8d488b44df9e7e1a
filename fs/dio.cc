#include "fs/dio.h"

#include <algorithm>
#include <cstring>

namespace deferfs {

DioEngine::DioEngine(CompletionMode mode, std::vector<Poller*> pollers, Workqueue* wq, IomapOps* iomap, EndIo end_io)
    : mode_(mode), pollers_(std::move(pollers)), wq_(wq), iomap_(iomap), end_io_(std::move(end_io)) {}

Poller* DioEngine::PickPoller() {
  // Each submitting thread sticks to one poller, so its bios stay in order
  // and pollers split the workers evenly.
  static std::atomic<unsigned> next{0};
  thread_local unsigned mine = next.fetch_add(1, std::memory_order_relaxed);
  return pollers_[mine % pollers_.size()];
}

// Completions that one thread runs back to back (its task_work, a batch of
// a completion thread's work) share their end work: allocating writes to one
// inode make one metadata commit between them instead of one each, as a
// journal groups transactions. Durability is unchanged: the shared commit is
// the same unsynced memtable write, and a request still replies only after
// it. O_DSYNC writes (synced before they report) and failed writes are never
// held back; nor is anything past the batch (TaskWork::RunBatch).
class DioBatch final : public CompletionBatch {
 public:
  void Add(Dio* dio) { dios_.push_back(dio); }
  void Complete() override;

 private:
  std::vector<Dio*> dios_;  // capacity kept: no allocation once warm
};

namespace {
thread_local DioBatch tls_batch;
}  // namespace

void DioBatch::Complete() {
  // Grouped by engine and inode, each group in completion order so the extent
  // map sees the same sequence of changes as one by one. Groups are gathered
  // in place (a batch is nearly always one file: nothing moves), without the
  // buffer a stable sort would allocate.
  auto same_file = [](const Dio* a, const Dio* b) { return a->engine == b->engine && a->inode == b->inode; };
  for (size_t i = 0; i < dios_.size();) {
    size_t j = i + 1;
    for (size_t k = j; k < dios_.size(); k++) {
      if (!same_file(dios_[k], dios_[i])) continue;
      std::rotate(dios_.begin() + static_cast<ptrdiff_t>(j), dios_.begin() + static_cast<ptrdiff_t>(k),
                  dios_.begin() + static_cast<ptrdiff_t>(k) + 1);
      j++;
    }
    DioEngine* engine = dios_[i]->engine;
    const int ret = engine->end_io_(std::span<Dio* const>(dios_.data() + i, j - i));
    for (size_t k = i; k < j; k++) {
      Kiocb* iocb = dios_[k]->iocb;
      iocb->ki_complete(iocb, engine->iomap_dio_finish(dios_[k], ret));
    }
    i = j;
  }
  dios_.clear();
}

// Runs the filesystem's completion work and drops the DIO's hold on the
// inode; returns what the request reports. Frees the dio.
ssize_t DioEngine::iomap_dio_complete(Dio* dio) {
  const int e = dio->flags & Dio::DIO_WRITE ? end_io_(std::span<Dio* const>(&dio, 1)) : 0;
  return iomap_dio_finish(dio, e);
}

// The rest of iomap_dio_complete once end_io returned `end_io_ret`.
ssize_t DioEngine::iomap_dio_finish(Dio* dio, int end_io_ret) {
  std::unique_ptr<Dio> owned(dio);
  int err = dio->error.load(std::memory_order_acquire);
  ssize_t ret = err ? err : static_cast<ssize_t>(dio->size);
  if (end_io_ret < 0 && ret >= 0) ret = end_io_ret;
  if (ret < 0) stats_.errors.fetch_add(1, std::memory_order_relaxed);
  inode_dio_end(dio->inode);
  stats_.inflight.fetch_sub(1, std::memory_order_release);
  return ret;
}

// A completion away from the IO path (the issuer's task_work or a completion
// thread): writes with metadata to commit join the thread's batch if it has
// one, and then report through ki_complete when the batch completes.
ssize_t DioEngine::iomap_dio_complete_async(Dio* dio) {
  const bool shares_commit = (dio->flags & Dio::DIO_WRITE) && !(dio->flags & Dio::DIO_DSYNC) &&
                             !dio->pure_overwrite() && dio->error.load(std::memory_order_acquire) == 0;
  if (shares_commit && TaskWork::Current()->DeferToBatch(&tls_batch)) {
    tls_batch.Add(dio);
    return kIocbQueued;
  }
  return iomap_dio_complete(dio);
}

// The kiocb's dio_complete: runs in the issuer's context (its task_work).
ssize_t DioEngine::iomap_dio_deferred_complete(void* data) {
  Dio* dio = static_cast<Dio*>(data);
  dio->engine->stats_.completed_deferred.fetch_add(1, std::memory_order_relaxed);
  return dio->engine->iomap_dio_complete_async(dio);
}

void DioEngine::iomap_dio_complete_work(WorkItem* work) {
  Dio* dio = static_cast<Dio*>(work->data);
  DioEngine* engine = dio->engine;
  Kiocb* iocb = dio->iocb;
  engine->stats_.completed_workqueue.fetch_add(1, std::memory_order_relaxed);
  const ssize_t res = engine->iomap_dio_complete_async(dio);
  if (res != kIocbQueued) iocb->ki_complete(iocb, res);
}

// The completion decision: called once per dio, by whoever dropped the last
// reference — the poller (its "IRQ"), or the submitter when nothing was left
// in flight. Reads and pure overwrites have no work to do; everything else
// needs a context that may block on a metadata commit or a flush.
void DioEngine::iomap_dio_done(Dio* dio) {
  Kiocb* iocb = dio->iocb;
  (dio->flags & Dio::DIO_WRITE ? stats_.write_device : stats_.read_device).Record(MonotonicNs() - dio->start_ns);
  if (dio->wait_for_completion) {
    TaskWork* submitter = dio->submitter;  // dio may be gone once done is set
    dio->done.store(true, std::memory_order_release);
    submitter->Wake();
    return;
  }

  enum class Path { kInline, kWorkqueue, kDefer } path = Path::kWorkqueue;
  const bool failed = dio->error.load(std::memory_order_acquire) != 0;
  if (!(dio->flags & Dio::DIO_WRITE)) {
    path = Path::kInline;
  } else {
    switch (mode_) {
      case CompletionMode::kInline: path = Path::kInline; break;
      case CompletionMode::kWorkqueue: path = Path::kWorkqueue; break;
      case CompletionMode::kDefer: path = Path::kDefer; break;
      case CompletionMode::kAuto:
        path = dio->pure_overwrite() && !failed ? Path::kInline : Path::kDefer;
        break;
      case CompletionMode::kSync: path = Path::kWorkqueue; break;  // sync iocbs never get here
    }
  }
  // The seed's contract: deferral only if the issuer said it can run it.
  if (path == Path::kDefer && !(iocb->ki_flags & IOCB_DIO_DEFER)) path = Path::kWorkqueue;

  switch (path) {
    case Path::kInline:
      stats_.completed_inline.fetch_add(1, std::memory_order_relaxed);
      iocb->ki_complete(iocb, iomap_dio_complete(dio));
      break;
    case Path::kWorkqueue:
      dio->work.fn = iomap_dio_complete_work;
      dio->work.data = dio;
      wq_->Queue(&dio->work);
      break;
    case Path::kDefer:
      iocb->private_data = dio;
      iocb->dio_complete = iomap_dio_deferred_complete;
      iocb->ki_complete(iocb, 0);
      break;
  }
}

void DioEngine::iomap_dio_bio_end_io(Bio* bio) {
  Dio* dio = static_cast<Dio*>(bio->private_data);
  int err = 0;
  if (bio->result < 0) err = bio->result;
  else if (static_cast<uint32_t>(bio->result) != bio->len) err = -EIO;
  if (err) {
    int none = 0;
    dio->error.compare_exchange_strong(none, err, std::memory_order_acq_rel);
  }
  if (dio->ref.fetch_sub(1, std::memory_order_acq_rel) == 1) dio->engine->iomap_dio_done(dio);
}

ssize_t DioEngine::iomap_dio_rw(Kiocb* iocb, uint8_t* buf, int buf_index, size_t len) {
  Inode* inode = iocb->inode;
  const bool write = iocb->ki_flags & IOCB_WRITE;
  auto owned = std::make_unique<Dio>();
  Dio* dio = owned.get();
  dio->iocb = iocb;
  dio->inode = inode;
  dio->engine = this;
  dio->pos = iocb->pos;
  dio->size = len;
  dio->start_ns = MonotonicNs();
  if (write) dio->flags |= Dio::DIO_WRITE;
  if (iocb->ki_flags & IOCB_DSYNC) dio->flags |= Dio::DIO_DSYNC;
  // O_SYNC: the completion commits the inode (its new mtime) durably, even
  // for a pure overwrite that O_DSYNC would let go without metadata.
  if (iocb->ki_flags & IOCB_SYNC) dio->flags |= Dio::DIO_DSYNC | Dio::DIO_NEED_SYNC;
  if (iocb->ki_complete == nullptr) {
    dio->wait_for_completion = true;
    dio->submitter = TaskWork::Current();
  }
  (write ? stats_.writes : stats_.reads).fetch_add(1, std::memory_order_relaxed);
  stats_.inflight.fetch_add(1, std::memory_order_relaxed);
  inode_dio_begin(inode);

  const uint64_t pos = iocb->pos;
  size_t io_len = len;
  {
    std::unique_lock l(inode->mu);
    if (write) {
      dio->isize = iocb->ki_isize ? iocb->ki_isize : pos + len;
      if (dio->isize > inode->rec.size && !(iocb->ki_flags & IOCB_NOEXTEND)) dio->flags |= Dio::DIO_EXTENDING;
    } else {
      // Reads stop at EOF; the device still reads whole blocks.
      uint64_t isize = inode->rec.size;
      dio->size = pos >= isize ? 0 : std::min<uint64_t>(len, isize - pos);
      io_len = (dio->size + kBlockSize - 1) & ~uint64_t{kBlockSize - 1};
    }
    dio->bios.reserve(io_len >> kBlockShift);
    for (size_t done = 0; done < io_len;) {
      Iomap map;
      Status st = iomap_->Begin(inode, pos + done, io_len - done, write ? unsigned{IOMAP_WRITE} : 0u, &map);
      if (st.err() == EAGAIN) {
        // Another write is filling this hole: let it finish first.
        const uint64_t lblk = (pos + done) >> kBlockShift;
        l.unlock();
        TaskWork::Current()->WaitUntil(
            [&] {
              std::lock_guard g(inode->mu);
              auto it = inode->new_extents.upper_bound(lblk);
              return it == inode->new_extents.begin() || lblk >= std::prev(it)->first + std::prev(it)->second.len;
            },
            &inode->dio_wq);
        l.lock();
        continue;
      }
      if (!st.ok()) {
        dio->error.store(-st.err(), std::memory_order_relaxed);
        break;
      }
      if (!write && map.type != Iomap::MAPPED) {
        std::memset(buf + done, 0, map.length);  // holes and unwritten blocks read as zeros, no IO
      } else {
        if (map.type == Iomap::UNWRITTEN) dio->flags |= Dio::DIO_NEED_CONVERT;
        if (map.flags & IOMAP_F_NEW) dio->new_lblks.push_back(map.offset >> kBlockShift);
        // FUA makes the data durable, not the metadata that finds it.
        if ((map.flags & IOMAP_F_DIRTY) && (dio->flags & Dio::DIO_DSYNC)) dio->flags |= Dio::DIO_NEED_SYNC;
        Bio& bio = dio->bios.emplace_back();
        bio.op = write ? Bio::Op::kWrite : Bio::Op::kRead;
        bio.dev_offset = map.addr;
        bio.buf = buf + done;
        bio.len = static_cast<uint32_t>(map.length);
        bio.buf_index = buf_index;
        bio.fua = dio->flags & Dio::DIO_DSYNC;
        bio.end_io = iomap_dio_bio_end_io;
        bio.private_data = dio;
      }
      done += map.length;
    }
  }
  if (write && dio->pure_overwrite()) stats_.pure_overwrites.fetch_add(1, std::memory_order_relaxed);

  // One reference per bio, taken before the first can complete.
  dio->ref.fetch_add(static_cast<int>(dio->bios.size()), std::memory_order_relaxed);
  if (!dio->bios.empty()) {
    Poller* poller = PickPoller();
    for (Bio& bio : dio->bios) poller->Submit(&bio);
  }

  // Once the submission reference is gone an async dio may complete and be
  // freed at any moment: read nothing from it after that unless it is sync.
  const bool wait = dio->wait_for_completion;
  const bool no_io = dio->bios.empty();
  Dio* raw = owned.release();
  if (raw->ref.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    // Nothing left in flight: the submitter completes it, as the kernel does.
    if (!no_io) {
      (raw->flags & Dio::DIO_WRITE ? stats_.write_device : stats_.read_device).Record(MonotonicNs() - raw->start_ns);
    }
    (wait && !no_io ? stats_.completed_sync : stats_.completed_at_submit).fetch_add(1, std::memory_order_relaxed);
    return iomap_dio_complete(raw);
  }
  if (!wait) return kIocbQueued;
  dio->submitter->WaitUntil([dio] { return dio->done.load(std::memory_order_acquire); });
  stats_.completed_sync.fetch_add(1, std::memory_order_relaxed);
  return iomap_dio_complete(dio);
}

}  // namespace deferfs
