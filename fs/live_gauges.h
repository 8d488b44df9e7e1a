// LiveGauges: how many of the objects a request creates are alive right now,
// for `deferfs stats` (fs/stats.cc). Idle, every one reads 0; a leak shows as
// a gauge that never returns. Relaxed atomics: gauges, not synchronization.
#pragma once

#include <atomic>
#include <cstdint>

namespace deferfs {

struct LiveGauges {
  std::atomic<int64_t> fuse_requests{0};    // READ/WRITE requests not yet answered (FuseIo alive)
  std::atomic<int64_t> request_buffers{0};  // IoBuffers held by those requests
  std::atomic<int64_t> open_files{0};       // file handles the kernel has not released

  static void Up(std::atomic<int64_t>& g) { g.fetch_add(1, std::memory_order_relaxed); }
  static void Down(std::atomic<int64_t>& g) { g.fetch_sub(1, std::memory_order_relaxed); }
};

}  // namespace deferfs
