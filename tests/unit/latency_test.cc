// LatencyHistogram: percentiles within a bucket (12.5 %) of the truth, and
// the exported buckets carry enough to take the percentiles of an interval
// from two snapshots, as `deferfs stats --watch` does.
#include "fs/latency.h"

#include <gtest/gtest.h>

namespace deferfs {
namespace {

constexpr double kBucketError = 0.125;

void ExpectNear(double got_us, double want_us) { EXPECT_NEAR(got_us, want_us, want_us * kBucketError); }

TEST(LatencyHistogramTest, PercentilesOfAKnownDistribution) {
  LatencyHistogram h;
  for (int i = 1; i <= 1000; i++) h.Record(i * 1000);  // 1..1000 us, evenly
  LatencyHistogram::Summary s = h.Summarize();
  EXPECT_EQ(s.count, 1000u);
  ExpectNear(s.p50_us, 500);
  ExpectNear(s.p99_us, 990);
  EXPECT_DOUBLE_EQ(s.max_us, 1000);      // exact, not the bucket's middle
  EXPECT_DOUBLE_EQ(s.mean_us, 500.5);    // exact
}

TEST(LatencyHistogramTest, BucketsSummarizeAsTheHistogramDoes) {
  LatencyHistogram h;
  for (int i = 0; i < 99; i++) h.Record(20'000);
  h.Record(5'000'000);
  LatencyHistogram::Buckets b = h.NonEmptyBuckets();
  ASSERT_EQ(b.size(), 2u);
  EXPECT_LT(b[0].first, b[1].first);
  EXPECT_EQ(b[0].second, 99u);
  LatencyHistogram::Summary from_buckets = LatencyHistogram::SummarizeBuckets(b);
  LatencyHistogram::Summary direct = h.Summarize();
  EXPECT_EQ(from_buckets.count, direct.count);
  EXPECT_DOUBLE_EQ(from_buckets.p50_us, direct.p50_us);
  EXPECT_DOUBLE_EQ(from_buckets.p99_us, direct.p99_us);
  ExpectNear(from_buckets.max_us, 5000);
  ExpectNear(direct.p50_us, 20);
  EXPECT_TRUE(LatencyHistogram::SummarizeBuckets({}).count == 0);
}

// Slow requests first, then fast ones: the difference of two snapshots
// describes only the fast ones, where the lifetime summary does not.
TEST(LatencyHistogramTest, DifferenceOfSnapshotsIsTheInterval) {
  LatencyHistogram h;
  for (int i = 0; i < 1000; i++) h.Record(8'000'000);
  const LatencyHistogram::Buckets before = h.NonEmptyBuckets();
  for (int i = 0; i < 100; i++) h.Record(30'000);
  const LatencyHistogram::Buckets after = h.NonEmptyBuckets();

  LatencyHistogram::Summary s = LatencyHistogram::SummarizeBuckets(LatencyHistogram::Since(before, after));
  EXPECT_EQ(s.count, 100u);
  ExpectNear(s.p50_us, 30);
  ExpectNear(s.p99_us, 30);
  ExpectNear(h.Summarize().p50_us, 8000);
  EXPECT_TRUE(LatencyHistogram::Since(after, after).empty()) << "nothing recorded in between";
}

// A reset between the snapshots: the later one is all there is to go by.
TEST(LatencyHistogramTest, SinceAResetIsTheLaterSnapshot) {
  LatencyHistogram h;
  for (int i = 0; i < 10; i++) h.Record(8'000'000);
  const LatencyHistogram::Buckets before = h.NonEmptyBuckets();
  h.Reset();
  for (int i = 0; i < 3; i++) h.Record(30'000);
  const LatencyHistogram::Buckets after = h.NonEmptyBuckets();
  EXPECT_EQ(LatencyHistogram::Since(before, after), after);
}

TEST(LatencyHistogramTest, ResetEmptiesIt) {
  LatencyHistogram h;
  h.Record(1000);
  h.Reset();
  EXPECT_EQ(h.Summarize().count, 0u);
  EXPECT_TRUE(h.NonEmptyBuckets().empty());
}

}  // namespace
}  // namespace deferfs
