#include "fs/workqueue.h"

#include <pthread.h>

#include "fs/task_work.h"

namespace deferfs {

Workqueue::Workqueue(unsigned threads) {
  for (unsigned i = 0; i < threads; i++) threads_.emplace_back([this] { Run(); });
}

Workqueue::~Workqueue() {
  {
    std::lock_guard l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void Workqueue::Queue(WorkItem* item) {
  item->next = nullptr;
  {
    std::lock_guard l(mu_);
    if (tail_) tail_->next = item;
    else head_ = item;
    tail_ = item;
  }
  cv_.notify_one();
}

void Workqueue::Run() {
  pthread_setname_np(pthread_self(), "deferfs-cthread");  // as completion threads are called in the docs
  // Up to kBatch items at a time, run as one completion batch (their
  // metadata commits grouped); small enough that other threads share the work.
  constexpr int kBatch = 16;
  TaskWork* tw = TaskWork::Current();
  std::unique_lock l(mu_);
  for (;;) {
    cv_.wait(l, [this] { return head_ != nullptr || stop_; });
    if (head_ == nullptr) return;  // stop_ and drained
    WorkItem* batch = head_;
    WorkItem* last = head_;
    for (int n = 1; n < kBatch && last->next != nullptr; n++) last = last->next;
    head_ = last->next;
    if (!head_) tail_ = nullptr;
    last->next = nullptr;
    l.unlock();
    tw->RunBatch([batch] {
      for (WorkItem* item = batch; item != nullptr;) {
        WorkItem* next = item->next;  // fn may free the item
        item->fn(item);
        item = next;
      }
    });
    l.lock();
  }
}

}  // namespace deferfs
