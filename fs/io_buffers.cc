#include "fs/io_buffers.h"

namespace deferfs {
namespace {

constexpr size_t kPage = 4096;
thread_local RecvBuffer recv_slot;

}  // namespace

IoBufferPool::IoBufferPool(size_t count, size_t size) : size_(size) {
  memory_.reserve(count);
  buffers_.reserve(count);
  for (size_t i = 0; i < count; i++) {
    memory_.emplace_back(size, kPage);
    if (memory_.back().data() == nullptr) {
      buffers_.clear();
      return;
    }
    buffers_.push_back(IoBuffer{memory_.back().bytes(), size, static_cast<int>(i)});
  }
  for (auto& b : buffers_) free_.push_back(&b);
}

std::vector<iovec> IoBufferPool::iovecs() const {
  std::vector<iovec> v;
  for (const auto& b : buffers_) v.push_back({b.base, b.size});
  return v;
}

IoBuffer* IoBufferPool::Get() {
  IoBuffer* got = nullptr;
  auto take = [&] {
    std::lock_guard l(mu_);
    if (free_.empty()) return false;
    got = free_.back();
    free_.pop_back();
    return true;
  };
  if (!take()) TaskWork::Current()->WaitUntil(take, &wq_);
  return got;
}

void IoBufferPool::Put(IoBuffer* b) {
  {
    std::lock_guard l(mu_);
    free_.push_back(b);
  }
  wq_.WakeAll();
}

size_t IoBufferPool::available() const {
  std::lock_guard l(mu_);
  return free_.size();
}

void RecvBufferSlot::Set(RecvBuffer b) { recv_slot = b; }
RecvBuffer RecvBufferSlot::Take() {
  RecvBuffer b = recv_slot;
  recv_slot = RecvBuffer{};
  return b;
}

}  // namespace deferfs
