#include "fs/extent_map.h"

#include <gtest/gtest.h>

#include <map>
#include <optional>
#include <ostream>
#include <random>
#include <set>
#include <vector>

namespace deferfs {

static void PrintTo(const Extent& e, std::ostream* os) {
  *os << "{" << e.lblk << "+" << e.len << " -> " << e.pblk
      << (e.state == ExtentState::kWritten ? " W}" : " U}");
}

namespace {

constexpr ExtentState W = ExtentState::kWritten;
constexpr ExtentState U = ExtentState::kUnwritten;

using Snap = std::map<uint64_t, Extent>;

Snap SnapshotOf(const ExtentMap& m) {
  Snap s;
  m.ForEach([&s](const Extent& e) { s[e.lblk] = e; });
  return s;
}

std::vector<Extent> Extents(const ExtentMap& m) {
  std::vector<Extent> v;
  m.ForEach([&v](const Extent& e) { v.push_back(e); });
  return v;
}

std::set<uint64_t> Blocks(const std::vector<BlockRange>& ranges) {
  std::set<uint64_t> out;
  for (const BlockRange& r : ranges) {
    EXPECT_GT(r.len, 0u);
    for (uint64_t b = r.start; b < r.start + r.len; b++) {
      EXPECT_TRUE(out.insert(b).second) << "block " << b << " freed twice";
    }
  }
  return out;
}

// Applying `d` (removed, then upserted) to `before` must give `after`. With
// `exact`, every entry is also a real change of a single operation.
void CheckDelta(const Snap& before, const Snap& after, const ExtentDelta& d, bool exact) {
  Snap applied = before;
  std::set<uint64_t> keys;
  for (uint64_t k : d.removed) {
    ASSERT_TRUE(keys.insert(k).second) << "key " << k << " listed twice";
    if (exact) {
      ASSERT_TRUE(before.count(k)) << "removed key " << k << " never existed";
      ASSERT_FALSE(after.count(k)) << "removed key " << k << " still exists";
    }
    applied.erase(k);
  }
  for (const Extent& e : d.upserted) {
    ASSERT_TRUE(keys.insert(e.lblk).second) << "key " << e.lblk << " listed twice";
    auto it = before.find(e.lblk);
    if (exact) {
      ASSERT_TRUE(it == before.end() || it->second != e) << "unchanged key " << e.lblk;
    }
    applied[e.lblk] = e;
  }
  ASSERT_EQ(applied, after);
}

struct Slot {
  uint64_t pblk = 0;
  ExtentState state = W;
};

// Reference model: one optional mapping per logical block.
class Model {
 public:
  explicit Model(uint64_t blocks) : slots_(blocks) {}

  uint64_t size() const { return slots_.size(); }

  void Insert(const Extent& e) {
    for (uint64_t i = 0; i < e.len; i++) slots_[e.lblk + i] = Slot{e.pblk + i, e.state};
  }
  void Punch(uint64_t lblk, uint64_t len) {
    for (uint64_t b = lblk; b < size() && b - lblk < len; b++) slots_[b].reset();
  }
  void Convert(uint64_t lblk, uint64_t len) {
    for (uint64_t b = lblk; b < size() && b - lblk < len; b++) {
      if (slots_[b]) slots_[b]->state = W;
    }
  }
  std::set<uint64_t> Referenced() const {
    std::set<uint64_t> out;
    for (const auto& s : slots_) {
      if (s) out.insert(s->pblk);
    }
    return out;
  }

  // Checks every Find answer (a mapped block reports the maximal mergeable
  // run from it, so this also proves merging), the counters and invariants.
  void Check(const ExtentMap& m) const {
    ASSERT_TRUE(m.CheckInvariants().ok()) << m.CheckInvariants().ToString();
    uint64_t mapped = 0;
    size_t runs = 0;
    for (uint64_t b = 0; b < size() + 4; b++) {
      Extent got;
      uint64_t hole = 0;
      const bool found = m.Find(b, &got, &hole);
      const Slot* s = b < size() && slots_[b] ? &*slots_[b] : nullptr;
      ASSERT_EQ(found, s != nullptr) << "block " << b;
      if (s) {
        uint64_t n = 1;
        while (b + n < size() && slots_[b + n] && slots_[b + n]->pblk == s->pblk + n &&
               slots_[b + n]->state == s->state) {
          n++;
        }
        ASSERT_EQ(got, (Extent{b, n, s->pblk, s->state})) << "block " << b;
        mapped++;
        if (b == 0 || !slots_[b - 1] || slots_[b - 1]->pblk + 1 != s->pblk ||
            slots_[b - 1]->state != s->state) {
          runs++;
        }
      } else {
        uint64_t next = b + 1;
        while (next < size() && !slots_[next]) next++;
        ASSERT_EQ(hole, next < size() ? next - b : UINT64_MAX) << "block " << b;
      }
    }
    ASSERT_EQ(m.mapped_blocks(), mapped);
    ASSERT_EQ(m.size(), runs);

    const std::vector<Extent> all = Extents(m);
    auto want = all.begin();
    for (uint64_t b = 0; b < size() + 4; b++) {
      Extent got;
      while (want != all.end() && want->lblk + want->len <= b) ++want;
      ASSERT_EQ(m.NextAfter(b, &got), want != all.end()) << "block " << b;
      if (want != all.end()) {
        ASSERT_EQ(got, *want) << "block " << b;
      }
    }
  }

 private:
  std::vector<std::optional<Slot>> slots_;
};

void RunRandom(uint32_t seed, int steps, size_t leaf_capacity = ExtentMap::kLeafCapacity) {
  SCOPED_TRACE("seed " + std::to_string(seed) + ", leaves of " + std::to_string(leaf_capacity));
  std::mt19937_64 rng(seed);
  auto rand = [&rng](uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng); };
  constexpr uint64_t kBlocks = 256;
  ExtentMap m(leaf_capacity);
  Model model(kBlocks);
  uint64_t next_pblk = 1000;
  uint64_t last_end = 0;

  for (int step = 0; step < steps; step++) {
    SCOPED_TRACE("step " + std::to_string(step));
    const Snap before = SnapshotOf(m);
    std::set<uint64_t> referenced = model.Referenced();  // before, plus new blocks
    ExtentDelta d;
    // Mostly one operation per delta (checked exactly); sometimes several,
    // as a write completion gathering more than one range.
    const int ops = rand(5) == 0 ? 2 + static_cast<int>(rand(4)) : 1;
    for (int i = 0; i < ops; i++) {
      const uint64_t op = rand(100);
      const uint64_t lblk = rand(kBlocks + 8);
      const uint64_t len = rand(20) == 0 ? UINT64_MAX : 1 + rand(rand(4) == 0 ? 64 : 8);
      if (op < 45) {
        Extent e;
        Extent cur;
        uint64_t hole;
        if (op < 8 && m.Find(lblk, &cur, &hole)) {
          // Re-map blocks already mapped here, maybe in another state.
          e = {lblk, 1 + rand(cur.len), cur.pblk, rand(2) ? W : U};
        } else {
          // Often right after the last insert, physically contiguous, so
          // that neighbours merge.
          const uint64_t at = rand(2) ? last_end : lblk;
          e.lblk = std::min(at, kBlocks - 1);
          e.len = 1 + rand(std::min<uint64_t>(kBlocks - e.lblk, 32));
          next_pblk += rand(4) == 0 ? 1 : 0;
          e.pblk = next_pblk;
          next_pblk += e.len;
          e.state = rand(2) ? W : U;
          for (uint64_t b = e.pblk; b < e.pblk + e.len; b++) referenced.insert(b);
        }
        m.Insert(e, &d);
        model.Insert(e);
        last_end = e.lblk + e.len;
        ASSERT_EQ(m.last_pblk_hint(), e.pblk + e.len);
      } else if (op < 70) {
        m.Punch(lblk, len, &d);
        model.Punch(lblk, len);
      } else {
        m.Convert(lblk, len, &d);
        model.Convert(lblk, len);
      }
    }
    ASSERT_NO_FATAL_FAILURE(model.Check(m));
    ASSERT_NO_FATAL_FAILURE(CheckDelta(before, SnapshotOf(m), d, ops == 1));
    std::set<uint64_t> dropped;
    const std::set<uint64_t> after = model.Referenced();
    std::set_difference(referenced.begin(), referenced.end(), after.begin(), after.end(),
                        std::inserter(dropped, dropped.end()));
    ASSERT_EQ(Blocks(d.freed), dropped);
  }
}

TEST(ExtentMapTest, RandomAgainstModel) {
  for (uint32_t seed : {1u, 2u, 3u, 4u, 99u}) RunRandom(seed, 12000);
}

// Leaves of 4 to 8 extents: most windows then meet a leaf edge, and leaves
// split, join and empty all the time (CheckInvariants checks their bounds).
TEST(ExtentMapTest, RandomAgainstModelWithSmallLeaves) {
  for (uint32_t seed : {5u, 6u, 7u}) RunRandom(seed, 12000, 8);
}

TEST(ExtentMapTest, ManySingleBlockConvertsInOneUnwrittenExtent) {
  constexpr uint64_t kBlocks = 1 << 20;
  constexpr uint64_t kPblk = 5000;
  ExtentMap m;
  ExtentDelta d;
  m.Insert({0, kBlocks, kPblk, U}, &d);
  std::vector<bool> written(kBlocks, false);
  std::mt19937_64 rng(1);
  for (int i = 0; i < 200000; i++) {
    const uint64_t b = rng() % kBlocks;
    ExtentDelta one;
    m.Convert(b, 1, &one);
    // Only the extent holding b and its two neighbours can change.
    ASSERT_LE(one.removed.size() + one.upserted.size(), 4u) << "convert at " << b;
    ASSERT_TRUE(one.freed.empty());
    ASSERT_EQ(one.upserted.empty() && one.removed.empty(), written[b]) << "convert at " << b;
    written[b] = true;
  }
  ASSERT_TRUE(m.CheckInvariants().ok()) << m.CheckInvariants().ToString();
  EXPECT_EQ(m.mapped_blocks(), kBlocks);
  size_t runs = 1;
  for (uint64_t b = 1; b < kBlocks; b++) runs += written[b] != written[b - 1];
  EXPECT_EQ(m.size(), runs);
  EXPECT_GT(m.size(), 100000u);
  uint64_t bad = 0;
  m.ForEach([&](const Extent& e) {
    bad += e.pblk != kPblk + e.lblk;
    for (uint64_t b = e.lblk; b < e.lblk + e.len; b++) bad += written[b] != (e.state == W);
  });
  EXPECT_EQ(bad, 0u);
}

TEST(ExtentMapTest, InsertMergesContiguousNeighbours) {
  ExtentMap m;
  ExtentDelta d;
  m.Insert({10, 5, 100, W}, &d);
  EXPECT_EQ(m.last_pblk_hint(), 105u);
  d = {};
  m.Insert({15, 5, 105, W}, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{10, 10, 100, W}}));
  EXPECT_TRUE(d.removed.empty());
  EXPECT_EQ(d.upserted, (std::vector<Extent>{{10, 10, 100, W}}));
  EXPECT_TRUE(d.freed.empty());

  d = {};
  m.Insert({5, 5, 95, W}, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{5, 15, 95, W}}));
  EXPECT_EQ(d.removed, (std::vector<uint64_t>{10}));
  EXPECT_EQ(d.upserted, (std::vector<Extent>{{5, 15, 95, W}}));
  EXPECT_EQ(m.last_pblk_hint(), 100u);
  EXPECT_EQ(m.mapped_blocks(), 15u);
}

TEST(ExtentMapTest, NoMergeAcrossStateOrPhysicalGap) {
  ExtentMap m;
  ExtentDelta d;
  m.Insert({0, 4, 100, W}, &d);
  m.Insert({4, 4, 104, U}, &d);
  m.Insert({8, 4, 200, U}, &d);
  m.Insert({13, 4, 212, U}, &d);  // physically contiguous, logical gap
  EXPECT_EQ(m.size(), 4u);
  EXPECT_TRUE(m.CheckInvariants().ok());
}

TEST(ExtentMapTest, ConvertSplitsThenMergesBack) {
  ExtentMap m;
  ExtentDelta d;
  m.Insert({0, 10, 100, U}, &d);
  d = {};
  m.Convert(3, 2, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{0, 3, 100, U}, {3, 2, 103, W}, {5, 5, 105, U}}));
  EXPECT_TRUE(d.removed.empty());
  EXPECT_EQ(d.upserted, Extents(m));
  EXPECT_TRUE(d.freed.empty());

  d = {};
  m.Convert(5, 5, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{0, 3, 100, U}, {3, 7, 103, W}}));
  EXPECT_EQ(d.removed, (std::vector<uint64_t>{5}));
  EXPECT_EQ(d.upserted, (std::vector<Extent>{{3, 7, 103, W}}));

  d = {};
  m.Convert(0, 100, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{0, 10, 100, W}}));
  EXPECT_EQ(d.removed, (std::vector<uint64_t>{3}));
  EXPECT_EQ(d.upserted, (std::vector<Extent>{{0, 10, 100, W}}));

  d = {};
  m.Convert(0, 50, &d);  // written and holes stay as they are
  EXPECT_TRUE(d.empty());
}

// Zero range: mapped blocks turn unwritten in place, holes stay, nothing is freed.
TEST(ExtentMapTest, ConvertToUnwrittenKeepsTheBlocks) {
  ExtentMap m;
  ExtentDelta d;
  m.Insert({0, 4, 100, W}, &d);
  m.Insert({4, 2, 104, U}, &d);
  m.Insert({10, 4, 300, W}, &d);
  d = {};
  m.Convert(2, 10, &d, ExtentState::kUnwritten);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{0, 2, 100, W}, {2, 4, 102, U}, {10, 2, 300, U}, {12, 2, 302, W}}));
  EXPECT_EQ(d.removed, (std::vector<uint64_t>{4}));
  EXPECT_TRUE(d.freed.empty());
  EXPECT_TRUE(m.CheckInvariants().ok());
}

TEST(ExtentMapTest, ConvertMergesAcrossWrittenExtentsInRange) {
  ExtentMap m;
  ExtentDelta d;
  m.Insert({0, 2, 100, U}, &d);
  m.Insert({2, 2, 102, W}, &d);
  m.Insert({4, 2, 104, U}, &d);
  m.Insert({6, 2, 106, W}, &d);
  ASSERT_EQ(m.size(), 4u);
  d = {};
  m.Convert(0, 8, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{0, 8, 100, W}}));
  EXPECT_EQ(d.removed, (std::vector<uint64_t>{2, 4, 6}));
}

TEST(ExtentMapTest, PunchSplitsAndFreesExactly) {
  ExtentMap m;
  ExtentDelta d;
  m.Insert({0, 10, 100, W}, &d);
  d = {};
  m.Punch(3, 4, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{0, 3, 100, W}, {7, 3, 107, W}}));
  EXPECT_EQ(Blocks(d.freed), (std::set<uint64_t>{103, 104, 105, 106}));
  EXPECT_TRUE(d.removed.empty());
  EXPECT_EQ(d.upserted, Extents(m));
  EXPECT_EQ(m.mapped_blocks(), 6u);

  d = {};
  m.Punch(2, UINT64_MAX, &d);  // truncate to 2 blocks
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{0, 2, 100, W}}));
  EXPECT_EQ(Blocks(d.freed), (std::set<uint64_t>{102, 107, 108, 109}));
  EXPECT_EQ(d.removed, (std::vector<uint64_t>{7}));
  EXPECT_EQ(d.upserted, Extents(m));

  d = {};
  m.Punch(0, UINT64_MAX, &d);
  EXPECT_EQ(m.size(), 0u);
  EXPECT_EQ(m.mapped_blocks(), 0u);
  EXPECT_EQ(d.removed, (std::vector<uint64_t>{0}));
}

TEST(ExtentMapTest, InsertOverwriteFreesReplacedBlocks) {
  ExtentMap m;
  ExtentDelta d;
  m.Insert({0, 10, 100, U}, &d);
  m.Insert({20, 10, 200, W}, &d);
  d = {};
  m.Insert({5, 20, 500, W}, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{0, 5, 100, U}, {5, 20, 500, W}, {25, 5, 205, W}}));
  std::set<uint64_t> want;
  for (uint64_t b = 105; b < 110; b++) want.insert(b);
  for (uint64_t b = 200; b < 205; b++) want.insert(b);
  EXPECT_EQ(Blocks(d.freed), want);
  EXPECT_EQ(d.removed, (std::vector<uint64_t>{20}));
  EXPECT_EQ(d.upserted, Extents(m));
}

TEST(ExtentMapTest, ReinsertingMappedBlocksFreesNothing) {
  ExtentMap m;
  ExtentDelta d;
  m.Insert({0, 10, 100, U}, &d);
  d = {};
  m.Insert({2, 3, 102, W}, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{0, 2, 100, U}, {2, 3, 102, W}, {5, 5, 105, U}}));
  EXPECT_TRUE(d.freed.empty());
  d = {};
  m.Insert({0, 10, 100, W}, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{0, 10, 100, W}}));
  EXPECT_TRUE(d.freed.empty());
  EXPECT_EQ(d.removed, (std::vector<uint64_t>{2, 5}));
}

TEST(ExtentMapTest, FindAndNextAfter) {
  ExtentMap m;
  ExtentDelta d;
  Extent e;
  uint64_t hole = 0;
  EXPECT_FALSE(m.Find(0, &e, &hole));
  EXPECT_EQ(hole, UINT64_MAX);
  EXPECT_FALSE(m.NextAfter(0, &e));

  m.Insert({10, 5, 100, W}, &d);
  m.Insert({20, 5, 300, U}, &d);
  EXPECT_FALSE(m.Find(3, &e, &hole));
  EXPECT_EQ(hole, 7u);
  ASSERT_TRUE(m.Find(12, &e, &hole));
  EXPECT_EQ(e, (Extent{12, 3, 102, W}));
  EXPECT_FALSE(m.Find(15, &e, &hole));
  EXPECT_EQ(hole, 5u);
  ASSERT_TRUE(m.Find(24, &e, &hole));
  EXPECT_EQ(e, (Extent{24, 1, 304, U}));
  EXPECT_FALSE(m.Find(25, &e, &hole));
  EXPECT_EQ(hole, UINT64_MAX);

  ASSERT_TRUE(m.NextAfter(0, &e));
  EXPECT_EQ(e, (Extent{10, 5, 100, W}));
  ASSERT_TRUE(m.NextAfter(14, &e));
  EXPECT_EQ(e, (Extent{10, 5, 100, W})) << "untrimmed";
  ASSERT_TRUE(m.NextAfter(15, &e));
  EXPECT_EQ(e, (Extent{20, 5, 300, U}));
  EXPECT_FALSE(m.NextAfter(25, &e));
}

TEST(ExtentMapTest, LoadKeepsPersistedKeys) {
  ExtentMap m;
  m.Load({0, 4, 100, W});
  m.Load({8, 4, 108, U});
  EXPECT_TRUE(m.CheckInvariants().ok());
  EXPECT_EQ(m.mapped_blocks(), 8u);
  EXPECT_EQ(m.last_pblk_hint(), 112u);

  // An unmerged pair, as an older version might have persisted: kept as is
  // (the keys must match the store) and reported by CheckInvariants.
  m.Load({4, 4, 104, W});
  EXPECT_EQ(m.size(), 3u);
  Status s = m.CheckInvariants();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("merged"), std::string::npos) << s.message();

  // A convert next to it merges what it touches and leaves key 0 alone.
  ExtentDelta d;
  m.Convert(8, 4, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{0, 4, 100, W}, {4, 8, 104, W}}));
  EXPECT_EQ(d.removed, (std::vector<uint64_t>{8}));
  EXPECT_EQ(d.upserted, (std::vector<Extent>{{4, 8, 104, W}}));
}

TEST(ExtentMapTest, AccumulatedDeltaKeepsOnlyLatestEntryPerKey) {
  ExtentMap m;
  ExtentDelta d;
  m.Insert({0, 4, 100, U}, &d);
  m.Insert({8, 4, 108, U}, &d);
  m.Convert(0, 12, &d);
  m.Punch(0, 2, &d);
  EXPECT_EQ(Extents(m), (std::vector<Extent>{{2, 2, 102, W}, {8, 4, 108, W}}));
  Snap applied;
  for (uint64_t k : d.removed) applied.erase(k);
  for (const Extent& e : d.upserted) applied[e.lblk] = e;
  EXPECT_EQ(applied, SnapshotOf(m));
  EXPECT_EQ(d.upserted.size(), 2u) << "no stale upserts";
  EXPECT_EQ(Blocks(d.freed), (std::set<uint64_t>{100, 101}));
}

}  // namespace
}  // namespace deferfs
