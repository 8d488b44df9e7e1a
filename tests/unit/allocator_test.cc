#include "backend/allocator.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <thread>
#include <vector>

namespace deferfs {
namespace {

// Reference model: one bool per device block, and the allocator's placement
// rule spelled out block by block.
class Model {
 public:
  Model(uint64_t first, uint64_t end) : first_(first), used_(end, false) {}

  uint64_t end() const { return used_.size(); }
  bool Free(uint64_t b) const { return b >= first_ && b < end() && !used_[b]; }
  uint64_t free_blocks() const {
    return static_cast<uint64_t>(std::count(used_.begin() + first_, used_.end(), false));
  }
  bool AllFree(BlockRange r) const {
    if (r.start < first_ || r.start >= end() || r.len > end() - r.start) return false;
    for (uint64_t b = r.start; b < r.start + r.len; b++) {
      if (used_[b]) return false;
    }
    return true;
  }
  void Set(BlockRange r, bool used) {
    for (uint64_t b = r.start; b < r.start + r.len; b++) {
      ASSERT_NE(used_[b], used) << "block " << b;
      used_[b] = used;
    }
  }
  // What Allocate(goal, want) must return, or len 0 when full.
  BlockRange Expected(uint64_t goal, uint64_t want) const {
    uint64_t start = end();
    if (Free(goal)) {
      start = goal;
    } else {
      // First free block that begins a free run after goal, else wrap.
      for (uint64_t b = std::max(goal, first_); b < end() && start == end(); b++) {
        if (Free(b)) start = b;
      }
      for (uint64_t b = first_; b < end() && start == end(); b++) {
        if (Free(b)) start = b;
      }
    }
    if (start == end()) return {0, 0};
    uint64_t len = 0;
    while (len < want && Free(start + len)) len++;
    return {start, len};
  }

 private:
  uint64_t first_;
  std::vector<bool> used_;
};

void RunRandom(uint32_t seed, uint64_t first, uint64_t end, int steps) {
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto rand = [&rng](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };
  Allocator a(first, end);
  Model m(first, end);
  std::vector<BlockRange> held;
  ASSERT_EQ(a.total_blocks(), end - first);

  for (int step = 0; step < steps; step++) {
    SCOPED_TRACE("step " + std::to_string(step));
    const uint64_t op = rand(100);
    if (op < 45) {
      const uint64_t goal = rand(end + 16);
      const uint64_t want = 1 + (rand(4) == 0 ? rand(256) : rand(8));
      const BlockRange want_r = m.Expected(goal, want);
      BlockRange got{7, 7};
      Status s = a.Allocate(goal, want, &got);
      if (want_r.len == 0) {
        ASSERT_EQ(s.err(), ENOSPC) << s.ToString();
        continue;
      }
      ASSERT_TRUE(s.ok()) << s.ToString();
      ASSERT_TRUE(m.AllFree(got)) << "allocated used blocks at " << got.start << "+" << got.len;
      ASSERT_EQ(got.start, want_r.start) << "goal " << goal;
      ASSERT_EQ(got.len, want_r.len) << "goal " << goal << " want " << want;
      m.Set(got, true);
      held.push_back(got);
    } else if (op < 85) {
      if (held.empty()) continue;
      // Free a random piece of a held range, keeping the rest held.
      const size_t i = rand(held.size());
      const BlockRange h = held[i];
      const uint64_t off = rand(h.len);
      const BlockRange f{h.start + off, 1 + rand(h.len - off)};
      held[i] = held.back();
      held.pop_back();
      if (off > 0) held.push_back({h.start, off});
      if (f.start + f.len < h.start + h.len) {
        held.push_back({f.start + f.len, h.start + h.len - f.start - f.len});
      }
      a.Free(f);
      m.Set(f, false);
    } else {
      // Ranges that straddle either end of the device or used blocks too.
      const uint64_t start = rand(end + 8);
      const BlockRange r{start, rand(5) == 0 ? 0 : 1 + rand(32)};
      const bool ok = r.len > 0 && m.AllFree(r);
      Status s = a.MarkUsed(r);
      ASSERT_EQ(s.ok(), ok) << r.start << "+" << r.len << ": " << s.ToString();
      if (ok) {
        m.Set(r, true);
        held.push_back(r);
      } else {
        ASSERT_EQ(s.err(), EINVAL);
      }
    }
    ASSERT_EQ(a.free_blocks(), m.free_blocks());
  }

  for (const BlockRange& h : held) a.Free(h);
  ASSERT_EQ(a.free_blocks(), end - first);
  // Fully merged again: one allocation takes the whole device.
  BlockRange all;
  ASSERT_TRUE(a.Allocate(end / 2, end, &all).ok());
  ASSERT_TRUE(a.Allocate(first, end, &all).ok());
  EXPECT_EQ(all.start, first);
  EXPECT_EQ(all.len, end / 2 - first);
}

TEST(AllocatorTest, RandomAgainstModel) {
  for (uint32_t seed : {1u, 2u, 3u, 42u}) RunRandom(seed, 3, 2048, 20000);
}

TEST(AllocatorTest, RandomAgainstModelSmallDevice) {
  // Small enough that ENOSPC and wrap-around happen all the time.
  for (uint32_t seed : {7u, 8u, 9u}) RunRandom(seed, 1, 97, 20000);
}

TEST(AllocatorTest, GoalIsHonoured) {
  Allocator a(0, 1000);
  BlockRange r;
  ASSERT_TRUE(a.Allocate(100, 10, &r).ok());
  EXPECT_EQ(r.start, 100u);
  EXPECT_EQ(r.len, 10u);
  // A file's next allocation continues right after its last one.
  ASSERT_TRUE(a.Allocate(110, 5, &r).ok());
  EXPECT_EQ(r.start, 110u);
  EXPECT_EQ(r.len, 5u);
  // Goal inside a used range: the next free block after it.
  ASSERT_TRUE(a.Allocate(103, 4, &r).ok());
  EXPECT_EQ(r.start, 115u);
  // Goal inside the free gap before the used range.
  ASSERT_TRUE(a.Allocate(50, 100, &r).ok());
  EXPECT_EQ(r.start, 50u);
  EXPECT_EQ(r.len, 50u) << "stops at the used block at 100";
  EXPECT_EQ(a.free_blocks(), 1000u - 10 - 5 - 4 - 50);
}

TEST(AllocatorTest, WrapsAroundWhenNothingAfterGoal) {
  Allocator a(10, 20);
  BlockRange r;
  ASSERT_TRUE(a.Allocate(15, 5, &r).ok());
  EXPECT_EQ(r.start, 15u);
  ASSERT_TRUE(a.Allocate(17, 3, &r).ok());
  EXPECT_EQ(r.start, 10u);
  EXPECT_EQ(r.len, 3u);
  ASSERT_TRUE(a.Allocate(1000, 1, &r).ok()) << "goal past the end wraps too";
  EXPECT_EQ(r.start, 13u);
  ASSERT_TRUE(a.Allocate(0, 1, &r).ok()) << "goal before the start";
  EXPECT_EQ(r.start, 14u);
}

TEST(AllocatorTest, NoSpaceHasClearMessage) {
  Allocator a(0, 64);
  BlockRange r;
  ASSERT_TRUE(a.Allocate(0, 64, &r).ok());
  EXPECT_EQ(r.len, 64u);
  EXPECT_EQ(a.free_blocks(), 0u);
  Status s = a.Allocate(0, 1, &r);
  EXPECT_EQ(s.err(), ENOSPC);
  EXPECT_NE(s.message().find("device is full"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("0 of 64 blocks free"), std::string::npos) << s.message();
  a.Free({20, 2});
  ASSERT_TRUE(a.Allocate(0, 8, &r).ok());
  EXPECT_EQ(r.start, 20u);
  EXPECT_EQ(r.len, 2u);
}

TEST(AllocatorTest, ZeroWantIsInvalid) {
  Allocator a(0, 64);
  BlockRange r;
  EXPECT_EQ(a.Allocate(0, 0, &r).err(), EINVAL);
  EXPECT_EQ(a.free_blocks(), 64u);
}

TEST(AllocatorTest, FragmentationReturnsShorterPieces) {
  Allocator a(0, 100);
  BlockRange r;
  for (uint64_t b = 0; b < 100; b++) {
    ASSERT_TRUE(a.Allocate(b, 1, &r).ok());
    ASSERT_EQ(r.start, b);
  }
  for (uint64_t b = 0; b < 100; b += 2) a.Free({b, 1});
  EXPECT_EQ(a.free_blocks(), 50u);
  for (int i = 0; i < 50; i++) {
    ASSERT_TRUE(a.Allocate(0, 8, &r).ok());
    EXPECT_EQ(r.len, 1u);
    EXPECT_EQ(r.start % 2, 0u);
  }
  EXPECT_EQ(a.Allocate(0, 8, &r).err(), ENOSPC);
}

TEST(AllocatorTest, FreeMergesNeighbours) {
  Allocator a(0, 30);
  BlockRange r;
  ASSERT_TRUE(a.Allocate(0, 30, &r).ok());
  a.Free({10, 5});
  a.Free({20, 5});
  a.Free({15, 5});  // bridges both
  ASSERT_TRUE(a.Allocate(10, 30, &r).ok());
  EXPECT_EQ(r.start, 10u);
  EXPECT_EQ(r.len, 15u);
}

TEST(AllocatorTest, MarkUsedRejectsOverlapAndOutOfRange) {
  Allocator a(8, 1008);
  ASSERT_TRUE(a.MarkUsed({100, 10}).ok());
  EXPECT_EQ(a.free_blocks(), 990u);

  Status s = a.MarkUsed({105, 10});
  EXPECT_EQ(s.err(), EINVAL);
  EXPECT_NE(s.message().find("[105, 115)"), std::string::npos) << s.message();
  EXPECT_EQ(a.MarkUsed({95, 6}).err(), EINVAL) << "tail overlaps";
  EXPECT_EQ(a.MarkUsed({100, 10}).err(), EINVAL) << "marked twice";
  EXPECT_EQ(a.MarkUsed({102, 2}).err(), EINVAL) << "inside a used range";

  s = a.MarkUsed({4, 8});
  EXPECT_EQ(s.err(), EINVAL) << "before the data area";
  EXPECT_NE(s.message().find("[4, 12)"), std::string::npos) << s.message();
  EXPECT_EQ(a.MarkUsed({1000, 9}).err(), EINVAL) << "past the end";
  EXPECT_EQ(a.MarkUsed({UINT64_MAX - 1, 4}).err(), EINVAL) << "wraps";
  EXPECT_EQ(a.MarkUsed({200, 0}).err(), EINVAL) << "empty";
  EXPECT_EQ(a.free_blocks(), 990u) << "failed calls change nothing";

  ASSERT_TRUE(a.MarkUsed({95, 5}).ok());
  ASSERT_TRUE(a.MarkUsed({1000, 8}).ok());
  ASSERT_TRUE(a.MarkUsed({8, 1}).ok());
  EXPECT_EQ(a.free_blocks(), 1000u - 10 - 5 - 8 - 1);
  BlockRange r;
  ASSERT_TRUE(a.Allocate(95, 1, &r).ok());
  EXPECT_EQ(r.start, 110u);
}

TEST(AllocatorDeathTest, BadFreeAssertsOrIsIgnored) {
  Allocator a(10, 100);
  BlockRange r;
  ASSERT_TRUE(a.Allocate(20, 10, &r).ok());
  // Debug builds die; release builds ignore the whole call.
  EXPECT_DEBUG_DEATH(a.Free({25, 10}), "already free");
  EXPECT_DEBUG_DEATH(a.Free({50, 1}), "already free");
  EXPECT_DEBUG_DEATH(a.Free({5, 10}), "outside the device");
  EXPECT_DEBUG_DEATH(a.Free({95, 10}), "outside the device");
  EXPECT_EQ(a.free_blocks(), 80u);
  a.Free({20, 10});
  EXPECT_EQ(a.free_blocks(), 90u);
}

TEST(AllocatorTest, ConcurrentAllocateFreeNeverDoubleAllocates) {
  constexpr uint64_t kBlocks = 4096;
  Allocator a(0, kBlocks);
  constexpr int kThreads = 4;
  std::vector<std::vector<BlockRange>> held(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&a, &held, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < 5000; i++) {
        if (held[t].empty() || rng() % 3 != 0) {
          BlockRange r;
          if (a.Allocate(rng() % kBlocks, 1 + rng() % 16, &r).ok()) held[t].push_back(r);
        } else {
          a.Free(held[t].back());
          held[t].pop_back();
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  std::vector<bool> used(kBlocks, false);
  uint64_t n = 0;
  for (const auto& v : held) {
    for (const BlockRange& r : v) {
      for (uint64_t b = r.start; b < r.start + r.len; b++) {
        ASSERT_FALSE(used[b]) << "block " << b << " allocated twice";
        used[b] = true;
        n++;
      }
    }
  }
  EXPECT_EQ(a.free_blocks(), kBlocks - n);
}

}  // namespace
}  // namespace deferfs
