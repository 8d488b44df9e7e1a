// TaskWork: a thread's queue of deferred DIO completions (the kernel's
// task_work) and the one way that thread sleeps. Push()/Wake() are
// thread-safe and lock-free; everything else is called only by the owner.
//
// Why every wait goes through WaitUntil: a FUSE worker that sleeps while its
// own deferred completions sit in its queue can wait forever for them — the
// io_uring/iomap self-deadlock that made Linux 6.6-rc8 drop IOCB_DIO_CALLER_COMP.
// WaitUntil runs the owner's queue between checks, so a worker never blocks
// blind on anything a completion may be needed for (drains, the IO lock,
// buffers, its own sync IO).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

#include "backend/device.h"
#include "fs/kiocb.h"

namespace deferfs {

class TaskWork;

// Work queued to a thread's task_work by another thread (the kernel's
// callback_head): `func` runs on the owner, in RunPending.
struct TaskWorkCallback {
  TaskWorkCallback* next = nullptr;
  void (*func)(TaskWorkCallback*) = nullptr;
};

// Submissions the owner gathers and must send before it sleeps (the kernel's
// blk_plug, flushed when a task schedules): a thread that sleeps on a reply
// it has not sent yet would wait for itself.
class Plug {
 public:
  virtual void Flush() = 0;

 protected:
  ~Plug() = default;
};

// Requests whose end work is shared (the kernel's io_comp_batch): a
// completion run inside TaskWork::RunBatch may hand its request to a batch
// instead of finishing it, and the batch finishes all of them together.
class CompletionBatch {
 public:
  // Finishes every request handed in (ki_complete included) and empties.
  virtual void Complete() = 0;

 protected:
  ~CompletionBatch() = default;
};

// Threads waiting for a condition that another thread will make true, then
// call WakeAll(). Thread-safe. WakeAll costs one atomic load when nobody
// waits: a waiter counts itself (seq_cst) before it checks its condition,
// and a waker changes the condition before it reads the count.
class WaitQueue {
 public:
  void Add(TaskWork* tw);
  void Remove(TaskWork* tw);
  void WakeAll();

 private:
  std::atomic<int> nwaiters_{0};
  std::mutex mu_;
  std::vector<TaskWork*> waiters_;  // guarded by mu_
};

class TaskWork {
 public:
  TaskWork();
  TaskWork(const TaskWork&) = delete;
  TaskWork& operator=(const TaskWork&) = delete;

  // The calling thread's TaskWork: its worker's, or one made for the thread.
  static TaskWork* Current();
  // Installs `tw` as the calling thread's (the worker loop does, at start).
  static void SetCurrent(TaskWork* tw);

  // Queues a completion whose dio_complete the owner must run; wakes it if asleep.
  void Push(Kiocb* iocb);
  // Queues `cb` for the owner; wakes it if asleep. `cb` must stay alive until it ran.
  void Add(TaskWorkCallback* cb);
  // Wakes the owner if it is asleep (one eventfd write), else nothing.
  void Wake();
  // Owner: `plug` is flushed before every sleep in WaitUntil (nullptr: none).
  void SetPlug(Plug* plug) { plug_ = plug; }

  // Owner: runs every queued completion: res = dio_complete(private), then
  // ki_complete(iocb, res) with dio_complete cleared, all in one RunBatch.
  // A dio_complete that returns kIocbQueued handed its request to a batch,
  // which calls ki_complete before RunPending returns. Then the queued
  // callbacks. Returns how many completions and callbacks ran.
  size_t RunPending();

  // Owner: runs fn(); completions in it may DeferToBatch, and every batch
  // they used is completed before RunBatch returns, so nothing is ever left
  // held back when the thread goes on to block (see above).
  template <typename Fn>
  void RunBatch(Fn&& fn) {
    ++batch_depth_;
    fn();
    if (--batch_depth_ == 0) CompleteBatches();
  }
  // Owner: true if `batch` will be completed at the end of the current
  // RunBatch. Only in the outermost one and never while batches complete:
  // a completion that waits runs task_work in a nested RunBatch, and
  // finishing a batch there could take a lock its caller holds (a commit
  // runs under the inode's lock).
  bool DeferToBatch(CompletionBatch* batch);
  bool has_pending() const {
    return head_.load(std::memory_order_acquire) != nullptr || callbacks_.load(std::memory_order_acquire) != nullptr;
  }

  // Owner: returns once cond() holds, running queued completions while it
  // waits. Whoever makes cond() true must then Wake() this TaskWork, directly
  // or through `wq` (on which the owner is registered meanwhile).
  void WaitUntil(const std::function<bool()>& cond, WaitQueue* wq = nullptr);

  // Owner, for a loop that sleeps elsewhere (epoll on event_fd() and more):
  // PrepareSleep returns false if work is already pending (do not sleep);
  // after the sleep, Awake() must be called; it reads the eventfd unless
  // `consume` is false (the loop saw no wakeup on it: ConsumeWakeup when it does).
  // The loop flushes its own plug.
  bool PrepareSleep();
  void Awake(bool consume = true);
  void ConsumeWakeup();
  int event_fd() const { return event_fd_.get(); }

  struct Stats {
    std::atomic<uint64_t> deferred_run{0};     // dio_complete calls run here
    std::atomic<uint64_t> wakeups_made{0};     // eventfd writes
    std::atomic<uint64_t> wakeups_avoided{0};  // Wake() found the owner awake
  };
  const Stats& stats() const { return stats_; }

 private:
  void Sleep();  // blocks on event_fd until a Wake()
  void CompleteBatches();

  std::atomic<Kiocb*> head_{nullptr};  // LIFO; RunPending reverses it
  std::atomic<TaskWorkCallback*> callbacks_{nullptr};  // LIFO, likewise
  std::atomic<bool> sleeping_{false};
  UniqueFd event_fd_;
  Stats stats_;
  // Owner only.
  Plug* plug_ = nullptr;
  int batch_depth_ = 0;
  bool completing_batches_ = false;
  std::vector<CompletionBatch*> batches_;  // to complete when the outermost RunBatch ends
};

}  // namespace deferfs
