// RequestTable (mount/request_table.h): what goes in comes out once, under
// the kernel's unique pattern (steps of two) and under collisions, with
// inserts and removals interleaved in any order, checked against std::map.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <vector>

#include "mount/request_table.h"

namespace deferfs {
namespace {

TEST(RequestTableTest, TakeReturnsWhatWasInsertedOnce) {
  RequestTable<int> t(4);
  int a = 1, b = 2;
  t.Insert(2, &a);
  t.Insert(4, &b);
  EXPECT_EQ(t.Take(6), nullptr);
  EXPECT_EQ(t.Take(4), &b);
  EXPECT_EQ(t.Take(4), nullptr);
  EXPECT_EQ(t.Take(2), &a);
  EXPECT_EQ(t.Take(2), nullptr);
}

// Full to capacity, then random removals and reinsertions: every lookup
// must agree with a map, which fails if a backward shift leaves a hole in a
// probe run or moves a key before its home.
TEST(RequestTableTest, InterleavedUseMatchesAMap) {
  constexpr size_t kCap = 64;
  RequestTable<int> t(kCap);
  std::vector<int> values(20000);  // a value of its own for every insert
  size_t inserted = 0;
  std::map<uint64_t, int*> model;
  std::mt19937_64 rng(5);
  uint64_t next_unique = 2;
  for (int round = 0; round < 20000; round++) {
    if (model.size() < kCap && (model.empty() || rng() % 2)) {
      // Mostly the kernel's pattern (steps of two), sometimes far apart.
      uint64_t u = rng() % 4 ? (next_unique += 2) : (next_unique += 2) << 20;
      int* v = &values[inserted++];
      t.Insert(u, v);
      model[u] = v;
    } else {
      auto it = model.begin();
      std::advance(it, static_cast<long>(rng() % model.size()));
      ASSERT_EQ(t.Take(it->first), it->second) << "round " << round;
      model.erase(it);
    }
    if (round % 97 == 0) {  // absent keys stay absent
      ASSERT_EQ(t.Take(next_unique + 1), nullptr);
    }
  }
  for (const auto& [u, v] : model) EXPECT_EQ(t.Take(u), v);
}

}  // namespace
}  // namespace deferfs
