#include "fs/workqueue.h"

#include <pthread.h>

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
  std::unique_lock l(mu_);
  for (;;) {
    cv_.wait(l, [this] { return head_ != nullptr || stop_; });
    if (head_ == nullptr) return;  // stop_ and drained
    WorkItem* item = head_;
    head_ = item->next;
    if (!head_) tail_ = nullptr;
    l.unlock();
    item->fn(item);
    l.lock();
  }
}

}  // namespace deferfs
