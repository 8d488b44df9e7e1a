// Workqueue: the completion threads (cthreads=K) — the kernel's
// sb->s_dio_done_wq. Queue() is thread-safe; work runs on one of the threads,
// several items at a time in one TaskWork::RunBatch.
#pragma once

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace deferfs {

// Embedded in the object whose work it is (a Dio): no allocation to queue.
struct WorkItem {
  void (*fn)(WorkItem* item) = nullptr;
  void* data = nullptr;  // the owner, for fn
  WorkItem* next = nullptr;
};

class Workqueue {
 public:
  explicit Workqueue(unsigned threads);
  ~Workqueue();  // runs everything queued, then joins
  Workqueue(const Workqueue&) = delete;
  Workqueue& operator=(const Workqueue&) = delete;

  void Queue(WorkItem* item);

 private:
  void Run();

  std::mutex mu_;
  std::condition_variable cv_;
  WorkItem* head_ = nullptr;  // FIFO, guarded by mu_
  WorkItem* tail_ = nullptr;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace deferfs
