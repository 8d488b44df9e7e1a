#include "fs/latency.h"

#include <algorithm>
#include <bit>

namespace deferfs {

int LatencyHistogram::BucketOf(uint64_t ns) {
  if (ns < (1u << kSubBits)) return static_cast<int>(ns);
  int msb = 63 - std::countl_zero(ns);
  uint64_t sub = (ns >> (msb - kSubBits)) & ((1u << kSubBits) - 1);
  return ((msb - kSubBits + 1) << kSubBits) | static_cast<int>(sub);
}

uint64_t LatencyHistogram::BucketMid(int b) {
  if (b < (1 << kSubBits)) return static_cast<uint64_t>(b);
  int msb = (b >> kSubBits) + kSubBits - 1;
  uint64_t sub = static_cast<uint64_t>(b & ((1 << kSubBits) - 1));
  uint64_t lo = (uint64_t{1} << msb) | (sub << (msb - kSubBits));
  return lo + (uint64_t{1} << (msb - kSubBits)) / 2;
}

void LatencyHistogram::Record(int64_t ns) {
  uint64_t v = ns > 0 ? static_cast<uint64_t>(ns) : 0;
  buckets_[BucketOf(v)].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(v, std::memory_order_relaxed);
  uint64_t m = max_ns_.load(std::memory_order_relaxed);
  while (v > m && !max_ns_.compare_exchange_weak(m, v, std::memory_order_relaxed)) {
  }
}

void LatencyHistogram::Reset() {
  for (auto& b : buckets_) b.store(0, std::memory_order_relaxed);
  count_.store(0, std::memory_order_relaxed);
  sum_ns_.store(0, std::memory_order_relaxed);
  max_ns_.store(0, std::memory_order_relaxed);
}

LatencyHistogram::Summary LatencyHistogram::Summarize() const {
  Summary s;
  uint64_t total = 0;
  for (const auto& b : buckets_) total += b.load(std::memory_order_relaxed);
  if (total == 0) return s;
  s.count = total;
  uint64_t n = std::max<uint64_t>(count_.load(std::memory_order_relaxed), 1);
  s.mean_us = static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) / static_cast<double>(n) / 1000.0;
  s.max_us = static_cast<double>(max_ns_.load(std::memory_order_relaxed)) / 1000.0;
  uint64_t seen = 0;
  bool have50 = false;
  for (int i = 0; i < kBuckets; i++) {
    seen += buckets_[i].load(std::memory_order_relaxed);
    if (!have50 && seen * 2 >= total) {
      s.p50_us = static_cast<double>(BucketMid(i)) / 1000.0;
      have50 = true;
    }
    if (seen * 100 >= total * 99) {
      s.p99_us = static_cast<double>(BucketMid(i)) / 1000.0;
      break;
    }
  }
  return s;
}

}  // namespace deferfs
