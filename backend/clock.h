// The clocks deferfs reads, in nanoseconds. Thread-safe.
#pragma once

#include <time.h>

#include <cstdint>

namespace deferfs {

inline int64_t ClockNs(clockid_t clock) {
  timespec ts;
  clock_gettime(clock, &ts);
  return ts.tv_sec * 1'000'000'000LL + ts.tv_nsec;
}

// The wall clock: inode timestamps, the superblock's creation time.
inline int64_t NowNs() { return ClockNs(CLOCK_REALTIME); }

// For latencies and intervals.
inline int64_t MonotonicNs() { return ClockNs(CLOCK_MONOTONIC); }

}  // namespace deferfs
