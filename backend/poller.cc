#include "backend/poller.h"

#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "backend/fault_inject.h"
#include "backend/log.h"
#include "backend/ring.h"
#include "backend/undo_log.h"

namespace deferfs {

namespace {

constexpr unsigned kDevFileIndex = 0;    // registered-file slots
constexpr unsigned kEventFileIndex = 1;

// Single-writer counter: a plain load+store, no locked RMW.
void Bump(std::atomic<uint64_t>& c) {
  c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

}  // namespace

Poller::Poller(Key, const Device& dev, UniqueFd event_fd, PollerOptions opt)
    : dev_fd_(dev.fd()),
      dio_align_(dev.dio_align()),
      undo_log_(dev.undo_log()),
      event_fd_(std::move(event_fd)),
      opt_(std::move(opt)) {}

Status Poller::Create(const Device& dev, const PollerOptions& opt,
                      std::unique_ptr<Poller>* out) {
  // One SQ entry could hold the eventfd read alone: a bio waiting for room
  // would then wait for the poller's next wakeup, which might never come.
  if (opt.ring_depth < 2) return Status::Invalid("poller ring_depth must be at least 2");
  UniqueFd efd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!efd.valid()) {
    return Status::Error(errno, std::string("cannot create the poller's eventfd: ") +
                                    std::strerror(errno));
  }
  auto p = std::make_unique<Poller>(Key(), dev, std::move(efd), opt);
  // The ring is created on the poller thread: with IORING_SETUP_SINGLE_ISSUER
  // the creating task is the only one allowed to submit.
  std::promise<Status> ready;
  std::future<Status> setup = ready.get_future();
  p->thread_ = std::thread([raw = p.get(), &ready] { raw->ThreadMain(&ready); });
  Status st = setup.get();
  if (!st.ok()) {
    p->thread_.join();  // it returns right after reporting
    return st;
  }
  *out = std::move(p);
  return Status::Ok();
}

Poller::~Poller() {
  if (!thread_.joinable()) return;
  stop_.store(true, std::memory_order_seq_cst);
  WriteEventFd();  // unconditional: the stop must not depend on sleeping_
  thread_.join();
}

void Poller::WriteEventFd() {
  const uint64_t one = 1;
  // EAGAIN would need 2^64-2 unread wakeups; EINTR is retried.
  while (::write(event_fd_.get(), &one, sizeof(one)) < 0 && errno == EINTR) {
  }
}

void Poller::Submit(Bio* bio) {
  Bio* head = inbound_.load(std::memory_order_relaxed);
  do {
    bio->next = head;
  } while (!inbound_.compare_exchange_weak(head, bio, std::memory_order_seq_cst,
                                           std::memory_order_relaxed));
  submitted_.fetch_add(1, std::memory_order_relaxed);
  // The load filters the common awake case without a write to the shared
  // line; the exchange makes exactly one racing submitter pay the syscall.
  if (sleeping_.load(std::memory_order_seq_cst) &&
      sleeping_.exchange(false, std::memory_order_seq_cst)) {
    wakeups_made_.fetch_add(1, std::memory_order_relaxed);
    WriteEventFd();
  }
}

Poller::Stats Poller::stats() const {
  Stats s;
  s.wakeups_made = wakeups_made_.load(std::memory_order_relaxed);
  s.submitted = submitted_.load(std::memory_order_relaxed);
  // Every Submit() either wakes or not; deriving the second count keeps the
  // submit path at one counter RMW.
  s.wakeups_avoided = s.submitted > s.wakeups_made ? s.submitted - s.wakeups_made : 0;
  s.completed = completed_.load(std::memory_order_relaxed);
  s.sleeps = sleeps_.load(std::memory_order_relaxed);
  s.submit_batches = submit_batches_.load(std::memory_order_relaxed);
  return s;
}

void Poller::ThreadMain(std::promise<Status>* ready) {
  pthread_setname_np(pthread_self(), "deferfs-poller");
  Status st = Setup();
  const bool ok = st.ok();
  ready->set_value(std::move(st));  // `ready` dies with Create(): no touching after
  if (ok) Run();
  ring_.reset();
}

Status Poller::Setup() {
  DEFERFS_RETURN_IF_ERROR(Ring::Create(opt_.ring_depth, /*single_issuer=*/true, &ring_));
  const int files[] = {dev_fd_, event_fd_.get()};
  DEFERFS_RETURN_IF_ERROR(ring_->RegisterFiles(files));
  if (!opt_.buffers.empty()) DEFERFS_RETURN_IF_ERROR(ring_->RegisterBuffers(opt_.buffers));
  // One CQE is reserved for the eventfd read; with at most cq_entries
  // requests in flight the CQ can never overflow.
  slots_.resize(ring_->cq_entries() - 1);
  for (uint32_t i = 0; i < slots_.size(); ++i) {
    slots_[i].next = i + 1 < slots_.size() ? i + 1 : kNoSlot;
  }
  free_head_ = slots_.empty() ? kNoSlot : 0;
  return Status::Ok();
}

bool Poller::Idle() const {
  return busy_ == 0 && pending_head_ == nullptr && inbound_.load(std::memory_order_acquire) == nullptr;
}

void Poller::Run() {
  for (;;) {
    DrainInbound();
    Issue();
    if (Reap() > 0) continue;
    if (stop_.load(std::memory_order_acquire) && Idle()) return;

    // Nothing to reap: sleep until a CQE (IO completion or eventfd read).
    // Raise sleeping_, then re-check inbound_ (see poller.h).
    sleeping_.store(true, std::memory_order_seq_cst);
    if (inbound_.load(std::memory_order_seq_cst) != nullptr) {
      sleeping_.store(false, std::memory_order_relaxed);
      continue;
    }
    Bump(sleeps_);
    // SubmitAndWait rather than WaitCqe: it also submits the eventfd read
    // Issue() left for it, and any SQE a transient submit failure left behind.
    // Not counted in submit_batches_: that counts the enters made only to
    // submit, which is what re-arming the eventfd at once would add.
    ring_->SubmitAndWait(1);
    // A submitter may already have cleared it (and written the eventfd, whose
    // CQE we will just reap); either way we are awake now.
    sleeping_.store(false, std::memory_order_relaxed);
  }
}

// Runs end_io for each CQE, and issues the bios that arrived meanwhile
// before the next one: an end_io may be a FUSE reply of several
// microseconds, and a batch of them would otherwise hold every new bio back
// while the device idles. Costs an io_uring_enter per such turn instead of
// one per batch (README, "New bios between completions").
unsigned Poller::Reap() {
  return ring_->Reap([this](uint64_t user_data, int res) {
    OnCqe(user_data, res);
    if (inbound_.load(std::memory_order_relaxed) != nullptr) {
      DrainInbound();
      Issue();
    }
  });
}

void Poller::DrainInbound() {
  if (inbound_.load(std::memory_order_relaxed) == nullptr) return;
  Bio* lifo = inbound_.exchange(nullptr, std::memory_order_acquire);
  // Reverse into FIFO order, then append to pending.
  Bio* fifo = nullptr;
  Bio* last = lifo;
  while (lifo != nullptr) {
    Bio* next = lifo->next;
    lifo->next = fifo;
    fifo = lifo;
    lifo = next;
  }
  if (fifo == nullptr) return;
  if (pending_tail_ != nullptr) {
    pending_tail_->next = fifo;
  } else {
    pending_head_ = fifo;
  }
  pending_tail_ = last;
}

// Rejected here rather than by the kernel: the result must fit int32_t, a
// zero-length transfer would look like end-of-device, a bad buf_index would
// come back as a confusing EFAULT, and misalignment is not an error for
// every backing (ext4 silently falls back to buffered IO), so catch it the
// same way everywhere.
bool Poller::Valid(const Bio& bio) const {
  if (bio.op == Bio::Op::kFlush) return true;
  if (bio.op != Bio::Op::kRead && bio.op != Bio::Op::kWrite) return false;
  if (bio.len == 0 || bio.len > INT32_MAX) return false;
  const uint64_t mask = dio_align_ - 1;
  if ((bio.dev_offset | bio.len | reinterpret_cast<uintptr_t>(bio.buf)) & mask) return false;
  return bio.buf_index < 0 || static_cast<size_t>(bio.buf_index) < opt_.buffers.size();
}

// Turns retries, then pending bios, into SQEs while slots last; submits
// them. The eventfd read need only be armed before the poller sleeps, so it
// waits for the next submit (at the latest the sleep's own) rather than
// costing an io_uring_enter of its own after each wakeup.
void Poller::Issue() {
  if (!event_armed_ && !stop_.load(std::memory_order_relaxed)) event_armed_ = PrepEventRead();
  bool bios = false;
  for (;;) {
    uint32_t idx;
    if (retry_head_ != kNoSlot) {
      idx = retry_head_;
      retry_head_ = slots_[idx].next;
      if (retry_head_ == kNoSlot) retry_tail_ = kNoSlot;
    } else if (pending_head_ != nullptr && free_head_ != kNoSlot) {
      Bio* bio = pending_head_;
      pending_head_ = bio->next;
      if (pending_head_ == nullptr) pending_tail_ = nullptr;
      bio->next = nullptr;
      idx = free_head_;
      free_head_ = slots_[idx].next;
      ++busy_;
      slots_[idx].bio = bio;
      slots_[idx].done = 0;
      if (!Valid(*bio)) {
        EndIo(idx, -EINVAL);
        continue;
      }
      int32_t fault;
      if (opt_.fault_inject && bio->op == Bio::Op::kWrite && InjectedFault(*bio, &fault)) [[unlikely]] {
        EndIo(idx, fault);  // a failed write leaves the device untouched
        continue;
      }
      if (undo_log_ != nullptr) [[unlikely]] {
        if (bio->op == Bio::Op::kFlush) slots_[idx].undo_seq = undo_log_->FlushStarts();
        if (bio->op == Bio::Op::kWrite) {
          if (Status u = undo_log_->BeforeWrite(bio->dev_offset, bio->len, &slots_[idx].undo_seq); !u.ok()) {
            LogError("%s", u.message().c_str());
            EndIo(idx, -EIO);
            continue;
          }
        }
      }
    } else {
      break;
    }
    if (!PrepSlot(idx)) {
      // SQ full and a submit could not drain it: retry this one first.
      slots_[idx].next = retry_head_;
      retry_head_ = idx;
      if (retry_tail_ == kNoSlot) retry_tail_ = idx;
      break;
    }
    bios = true;
  }
  if (bios) SubmitBatch();
}

bool Poller::PrepEventRead() {
  struct io_uring_sqe* sqe = ring_->GetSqe();
  if (sqe == nullptr) {
    SubmitBatch();
    sqe = ring_->GetSqe();
    if (sqe == nullptr) return false;
  }
  io_uring_prep_read(sqe, kEventFileIndex, &event_buf_, sizeof(event_buf_), 0);
  io_uring_sqe_set_flags(sqe, IOSQE_FIXED_FILE);
  io_uring_sqe_set_data64(sqe, kEventTag);
  return true;
}

bool Poller::PrepSlot(uint32_t idx) {
  struct io_uring_sqe* sqe = ring_->GetSqe();
  if (sqe == nullptr) {
    SubmitBatch();
    sqe = ring_->GetSqe();
    if (sqe == nullptr) return false;
  }
  const Slot& s = slots_[idx];
  const Bio* bio = s.bio;
  if (bio->op == Bio::Op::kFlush) {
    io_uring_prep_fsync(sqe, kDevFileIndex, 0);
  } else {
    void* buf = static_cast<uint8_t*>(bio->buf) + s.done;
    const uint32_t len = bio->len - s.done;
    const uint64_t off = bio->dev_offset + s.done;
    const bool fixed = bio->buf_index >= 0;
    if (bio->op == Bio::Op::kRead) {
      if (fixed) {
        io_uring_prep_read_fixed(sqe, kDevFileIndex, buf, len, off, bio->buf_index);
      } else {
        io_uring_prep_read(sqe, kDevFileIndex, buf, len, off);
      }
    } else {
      if (fixed) {
        io_uring_prep_write_fixed(sqe, kDevFileIndex, buf, len, off, bio->buf_index);
      } else {
        io_uring_prep_write(sqe, kDevFileIndex, buf, len, off);
      }
      if (bio->fua) sqe->rw_flags = RWF_DSYNC;  // write-through: durable on completion
    }
  }
  io_uring_sqe_set_flags(sqe, IOSQE_FIXED_FILE);
  io_uring_sqe_set_data64(sqe, idx);
  return true;
}

void Poller::SubmitBatch() {
  int rc = ring_->Submit();
  if (rc > 0) Bump(submit_batches_);
  if (rc >= 0) return;
  // Transient: the SQEs stay in the SQ and go with the next enter (the
  // sleep path submits too). Anything else means the ring is unusable
  // (e.g. a single-issuer violation), a bug we cannot recover from.
  if (rc == -EINTR || rc == -EAGAIN || rc == -EBUSY) return;
  LogError("poller io_uring submit failed: %s", std::strerror(-rc));
  std::abort();
}

void Poller::OnCqe(uint64_t user_data, int res) {
  if (user_data == kEventTag) {
    event_armed_ = false;  // re-armed by the next Issue()
    return;
  }
  const uint32_t idx = static_cast<uint32_t>(user_data);
  Slot& s = slots_[idx];
  Bio* bio = s.bio;
  if (res < 0) return EndIo(idx, res);
  if (bio->op == Bio::Op::kFlush) {
    if (undo_log_ != nullptr) [[unlikely]] undo_log_->Flushed(s.undo_seq);
    return EndIo(idx, 0);
  }
  // A regular file may transfer less than asked (a block device never
  // does); continue with the rest. Zero bytes means we hit the end.
  if (res == 0) return EndIo(idx, -EIO);
  s.done += static_cast<uint32_t>(res);
  if (s.done >= bio->len) {
    int32_t fault;
    if (opt_.fault_inject && bio->op == Bio::Op::kRead && InjectedFault(*bio, &fault)) [[unlikely]] {
      return EndIo(idx, fault);  // judged by the data the device returned
    }
    if (undo_log_ != nullptr && bio->op == Bio::Op::kWrite) [[unlikely]] undo_log_->Completed(s.undo_seq, bio->fua);
    return EndIo(idx, static_cast<int32_t>(bio->len));
  }
  s.next = kNoSlot;
  if (retry_tail_ != kNoSlot) {
    slots_[retry_tail_].next = idx;
  } else {
    retry_head_ = idx;
  }
  retry_tail_ = idx;
}

void Poller::EndIo(uint32_t idx, int32_t result) {
  Slot& s = slots_[idx];
  Bio* bio = s.bio;
  s.bio = nullptr;
  s.next = free_head_;
  free_head_ = idx;
  --busy_;
  // Counted before end_io: the bio may be freed by it, and a waiter woken by
  // it must already see this completion in stats().
  Bump(completed_);
  bio->result = result;
  bio->end_io(bio);
}

}  // namespace deferfs
