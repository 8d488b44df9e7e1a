#include "fs/journal_commit.h"

#include <pthread.h>

#include <utility>

namespace deferfs {

JournalCommit::JournalCommit(std::chrono::milliseconds interval, std::function<void()> commit)
    : interval_(interval), commit_(std::move(commit)), thread_([this] { Run(); }) {}

JournalCommit::~JournalCommit() {
  {
    std::lock_guard l(mu_);
    stop_ = true;
  }
  cv_.notify_one();
  thread_.join();
}

void JournalCommit::Run() {
  pthread_setname_np(pthread_self(), "deferfs-commit");
  std::unique_lock l(mu_);
  while (!cv_.wait_for(l, interval_, [this] { return stop_; })) {
    l.unlock();
    commit_();
    l.lock();
  }
}

}  // namespace deferfs
