// LatencyHistogram: a lock-free log-linear histogram of nanosecond latencies
// (8 sub-buckets per power of two: percentiles within 12.5 %).
// Everything from any thread: a Summarize(), NonEmptyBuckets() or Reset()
// that races a Record() may miss it or see it in part, but never tears.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

#include "backend/clock.h"

namespace deferfs {

class LatencyHistogram {
 public:
  static constexpr int kSubBits = 3;
  static constexpr int kBuckets = 64 << kSubBits;

  void Record(int64_t ns);
  void Reset();

  struct Summary {
    uint64_t count = 0;
    double mean_us = 0, p50_us = 0, p99_us = 0, max_us = 0;
  };
  Summary Summarize() const;

  // The non-empty buckets in ascending order: (the bucket's middle in ns,
  // count). The report exports them, so that a reader can take the
  // percentiles of an interval from the difference of two reports.
  using Buckets = std::vector<std::pair<uint64_t, uint64_t>>;
  Buckets NonEmptyBuckets() const;
  // The summary of such buckets; mean and max to within a bucket (12.5 %).
  static Summary SummarizeBuckets(const Buckets& buckets);
  // What was recorded between two NonEmptyBuckets() of one histogram, or all
  // of `later` if a count went down in between (a Reset()).
  static Buckets Since(const Buckets& earlier, const Buckets& later);

 private:
  static int BucketOf(uint64_t ns);
  static uint64_t BucketMid(int b);

  std::array<std::atomic<uint64_t>, kBuckets> buckets_{};
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> sum_ns_{0};
  std::atomic<uint64_t> max_ns_{0};
};

}  // namespace deferfs
