#include "fs/task_work.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <memory>

namespace deferfs {
namespace {

thread_local TaskWork* current_tw = nullptr;

// The queues are lock-free LIFOs linked through `next`. A push is seq_cst:
// it pairs with PrepareSleep (see Wake).
template <typename T>
void PushLifo(std::atomic<T*>& head, T* item, T* T::*next) {
  T* old = head.load(std::memory_order_relaxed);
  do {
    item->*next = old;
  } while (!head.compare_exchange_weak(old, item, std::memory_order_seq_cst, std::memory_order_relaxed));
}

// Takes the whole LIFO and returns it in FIFO order: work runs in the order it was queued.
template <typename T>
T* TakeFifo(std::atomic<T*>& head, T* T::*next) {
  T* lifo = head.exchange(nullptr, std::memory_order_acquire);
  T* fifo = nullptr;
  while (lifo) {
    T* rest = lifo->*next;
    lifo->*next = fifo;
    fifo = lifo;
    lifo = rest;
  }
  return fifo;
}

}  // namespace

void WaitQueue::Add(TaskWork* tw) {
  nwaiters_.fetch_add(1, std::memory_order_seq_cst);
  std::lock_guard l(mu_);
  waiters_.push_back(tw);
}

void WaitQueue::Remove(TaskWork* tw) {
  {
    std::lock_guard l(mu_);
    waiters_.erase(std::find(waiters_.begin(), waiters_.end(), tw));
  }
  nwaiters_.fetch_sub(1, std::memory_order_relaxed);
}

void WaitQueue::WakeAll() {
  if (nwaiters_.load(std::memory_order_seq_cst) == 0) return;
  std::lock_guard l(mu_);
  for (TaskWork* tw : waiters_) tw->Wake();
}

TaskWork::TaskWork() : event_fd_(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

TaskWork* TaskWork::Current() {
  if (current_tw == nullptr) {
    // A thread that is not a FUSE worker (a test, a completion thread) still
    // waits through a TaskWork of its own; it lives as long as the thread.
    thread_local std::unique_ptr<TaskWork> own = std::make_unique<TaskWork>();
    current_tw = own.get();
  }
  return current_tw;
}

void TaskWork::SetCurrent(TaskWork* tw) { current_tw = tw; }

void TaskWork::Push(Kiocb* iocb) {
  PushLifo(head_, iocb, &Kiocb::ki_next);
  Wake();
}

void TaskWork::Add(TaskWorkCallback* cb) {
  PushLifo(callbacks_, cb, &TaskWorkCallback::next);
  Wake();
}

void TaskWork::Wake() {
  // Dekker pairing with PrepareSleep: the owner publishes sleeping_ and then
  // re-checks its conditions; we publish the condition and then read sleeping_.
  if (sleeping_.exchange(false, std::memory_order_seq_cst)) {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(event_fd_.get(), &one, sizeof(one));
    stats_.wakeups_made.fetch_add(1, std::memory_order_relaxed);
  } else {
    stats_.wakeups_avoided.fetch_add(1, std::memory_order_relaxed);
  }
}

size_t TaskWork::RunPending() {
  Kiocb* fifo = TakeFifo(head_, &Kiocb::ki_next);
  size_t n = 0;
  RunBatch([&] {
    while (fifo) {
      Kiocb* iocb = fifo;
      fifo = fifo->ki_next;
      ssize_t res = iocb->dio_complete(iocb->private_data);
      iocb->dio_complete = nullptr;
      iocb->private_data = nullptr;
      if (res != kIocbQueued) iocb->ki_complete(iocb, res);
      n++;
    }
  });
  stats_.deferred_run.fetch_add(n, std::memory_order_relaxed);
  for (TaskWorkCallback* cb = TakeFifo(callbacks_, &TaskWorkCallback::next); cb != nullptr;) {
    TaskWorkCallback* next = cb->next;  // read first: func may queue cb again
    cb->func(cb);
    cb = next;
    n++;
  }
  return n;
}

bool TaskWork::DeferToBatch(CompletionBatch* batch) {
  if (batch_depth_ != 1 || completing_batches_) return false;
  if (std::find(batches_.begin(), batches_.end(), batch) == batches_.end()) batches_.push_back(batch);
  return true;
}

void TaskWork::CompleteBatches() {
  // A batch completing may wait, and so run task_work in a nested RunBatch:
  // that one must not complete the batches being completed here.
  if (completing_batches_ || batches_.empty()) return;
  completing_batches_ = true;
  for (CompletionBatch* batch : batches_) batch->Complete();
  batches_.clear();
  completing_batches_ = false;
}

bool TaskWork::PrepareSleep() {
  sleeping_.store(true, std::memory_order_seq_cst);
  if (has_pending()) {
    sleeping_.store(false, std::memory_order_relaxed);
    return false;
  }
  return true;
}

void TaskWork::Awake(bool consume) {
  sleeping_.store(false, std::memory_order_relaxed);
  if (consume) ConsumeWakeup();
}

void TaskWork::ConsumeWakeup() {
  uint64_t v;
  [[maybe_unused]] ssize_t n = read(event_fd_.get(), &v, sizeof(v));
}

void TaskWork::Sleep() {
  pollfd p{event_fd_.get(), POLLIN, 0};
  while (poll(&p, 1, -1) < 0 && errno == EINTR) {
  }
}

void TaskWork::WaitUntil(const std::function<bool()>& cond, WaitQueue* wq) {
  if (wq) wq->Add(this);
  for (;;) {
    RunPending();
    if (cond()) break;
    if (!PrepareSleep()) continue;
    if (cond()) {
      Awake(/*consume=*/false);  // did not sleep: a racing Wake only makes the next Sleep return at once
      break;
    }
    if (plug_) plug_->Flush();
    Sleep();
    Awake();
  }
  if (wq) wq->Remove(this);
}

}  // namespace deferfs
