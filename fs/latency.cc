#include "fs/latency.h"

#include <algorithm>
#include <bit>
#include <map>

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

LatencyHistogram::Buckets LatencyHistogram::NonEmptyBuckets() const {
  Buckets out;
  for (int i = 0; i < kBuckets; i++) {
    if (uint64_t n = buckets_[i].load(std::memory_order_relaxed); n != 0) out.emplace_back(BucketMid(i), n);
  }
  return out;
}

LatencyHistogram::Summary LatencyHistogram::SummarizeBuckets(const Buckets& buckets) {
  Summary s;
  double sum_ns = 0;
  for (const auto& [ns, n] : buckets) {
    s.count += n;
    sum_ns += static_cast<double>(ns) * static_cast<double>(n);
  }
  if (s.count == 0) return s;
  s.mean_us = sum_ns / static_cast<double>(s.count) / 1000.0;
  s.max_us = static_cast<double>(buckets.back().first) / 1000.0;
  uint64_t seen = 0;
  bool have50 = false;
  for (const auto& [ns, n] : buckets) {
    seen += n;
    if (!have50 && seen * 2 >= s.count) {
      s.p50_us = static_cast<double>(ns) / 1000.0;
      have50 = true;
    }
    if (seen * 100 >= s.count * 99) {
      s.p99_us = static_cast<double>(ns) / 1000.0;
      break;
    }
  }
  return s;
}

LatencyHistogram::Buckets LatencyHistogram::Since(const Buckets& earlier, const Buckets& later) {
  std::map<uint64_t, uint64_t> now(later.begin(), later.end());
  for (const auto& [ns, n] : earlier) {
    if (now[ns] < n) return later;
    now[ns] -= n;
  }
  Buckets out;
  for (const auto& [ns, n] : now) {
    if (n != 0) out.emplace_back(ns, n);
  }
  return out;
}

LatencyHistogram::Summary LatencyHistogram::Summarize() const {
  Summary s = SummarizeBuckets(NonEmptyBuckets());
  if (s.count == 0) return s;
  // Exact where the histogram only approximates.
  uint64_t n = std::max<uint64_t>(count_.load(std::memory_order_relaxed), 1);
  s.mean_us = static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) / static_cast<double>(n) / 1000.0;
  s.max_us = static_cast<double>(max_ns_.load(std::memory_order_relaxed)) / 1000.0;
  return s;
}

}  // namespace deferfs
