// IoBufferPool: the aligned buffers every data request uses — FUSE receive
// buffers (a WRITE's payload lands aligned in them) and read reply buffers.
// They are registered with every poller's ring, so bios use fixed buffers.
// A buffer taken by an async request travels with it and comes back at reply.
// Thread-safe. Get() waits through TaskWork (never blind) when all are in use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include <sys/uio.h>

#include "backend/device.h"
#include "fs/task_work.h"

namespace deferfs {

struct IoBuffer {
  uint8_t* base = nullptr;  // page-aligned, `size` bytes
  size_t size = 0;
  int index = -1;  // registered buffer index
};

class IoBufferPool {
 public:
  // `count` buffers of `size` bytes each, page-aligned.
  IoBufferPool(size_t count, size_t size);

  bool ok() const { return !buffers_.empty(); }
  // iovecs in index order, for Poller registration.
  std::vector<iovec> iovecs() const;

  IoBuffer* Get();
  void Put(IoBuffer* b);
  size_t available() const;
  size_t buffer_size() const { return size_; }

 private:
  const size_t size_;
  std::vector<AlignedBuffer> memory_;
  std::vector<IoBuffer> buffers_;

  mutable std::mutex mu_;
  std::vector<IoBuffer*> free_;  // guarded by mu_
  WaitQueue wq_;
};

// The worker loop's receive buffer for the request being processed. A data
// operation that keeps the payload beyond the callback (an async write) takes
// it. An owned buffer is the taker's to return to the pool; a lent one (a FUSE
// ring entry's payload, which the kernel reuses only after the reply) is not,
// and a read may put its reply data there.
struct RecvBuffer {
  IoBuffer* buf = nullptr;
  bool owned = false;
};

class RecvBufferSlot {
 public:
  static void Set(RecvBuffer b);
  static RecvBuffer Take();  // the current buffer, now the caller's to use
};

}  // namespace deferfs
