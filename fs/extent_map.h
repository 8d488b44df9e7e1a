// ExtentMap: one inode's logical -> physical block map, in memory.
// Persisted as one RocksDB key per extent (ino, lblk); every mutation reports
// its exact key changes in an ExtentDelta so the caller can write them in the
// same WriteBatch as the rest of the operation.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "backend/allocator.h"
#include "backend/status.h"

namespace deferfs {

enum class ExtentState : uint8_t { kWritten, kUnwritten };

// Logical blocks [lblk, lblk + len) live at physical blocks [pblk, pblk + len).
struct Extent {
  uint64_t lblk = 0;
  uint64_t len = 0;
  uint64_t pblk = 0;
  ExtentState state = ExtentState::kWritten;

  bool operator==(const Extent&) const = default;
};

// What a mutation changed. Apply `removed`, then `upserted`, to the persisted
// keys to get the new map. `freed` are physical blocks the map no longer
// references, for the allocator (once the batch is durable).
// Mutations append, so one delta may gather several operations (a later
// operation's entry for a key replaces an earlier one).
struct ExtentDelta {
  std::vector<uint64_t> removed;  // lblk keys that no longer exist
  std::vector<Extent> upserted;   // extents new or changed, keyed by lblk
  std::vector<BlockRange> freed;

  bool empty() const { return removed.empty() && upserted.empty() && freed.empty(); }
};

// Sorted disjoint extents, mergeable neighbours always merged; O(log n + touched).
// Not thread-safe: the owning inode's lock protects it.
class ExtentMap {
 public:
  // Extents per leaf (below). Tests pass a small one to exercise leaf splits.
  static constexpr size_t kLeafCapacity = 64;
  explicit ExtentMap(size_t leaf_capacity = kLeafCapacity);

  // Mount-time load of one persisted extent; no merging (keys must stay as
  // persisted), overlap only asserted. Use CheckInvariants to verify.
  void Load(const Extent& e);

  // If an extent covers lblk, sets *out to it trimmed to start at lblk.
  // Else sets *hole_len to the blocks up to the next extent (UINT64_MAX if
  // none) and returns false.
  bool Find(uint64_t lblk, Extent* out, uint64_t* hole_len) const;

  // Maps [e.lblk, e.lblk + e.len) to e.pblk.. in e.state, replacing what was
  // there. e's physical blocks must not be mapped outside e's logical range;
  // re-mapping ones mapped inside it (a state change) does not free them.
  void Insert(const Extent& e, ExtentDelta* delta);

  // Unmaps [lblk, lblk + len): punch hole, truncate. len is clamped so that
  // UINT64_MAX means "to the end".
  void Punch(uint64_t lblk, uint64_t len, ExtentDelta* delta);

  // Gives the mapped blocks in [lblk, lblk + len) state `to`, splitting
  // extents at the edges; holes stay holes. Written: a write's completion;
  // unwritten: a zero range, which keeps the blocks (as ext4).
  void Convert(uint64_t lblk, uint64_t len, ExtentDelta* delta, ExtentState to = ExtentState::kWritten);

  // In lblk order.
  void ForEach(const std::function<void(const Extent&)>& fn) const;

  // The first extent ending after lblk, untrimmed (SEEK_DATA).
  bool NextAfter(uint64_t lblk, Extent* out) const;

  size_t size() const { return size_; }
  uint64_t mapped_blocks() const { return mapped_blocks_; }
  // Physical block right after the last inserted extent: the allocator goal
  // that keeps a file's blocks contiguous.
  uint64_t last_pblk_hint() const { return last_pblk_hint_; }

  // EINVAL describing the first broken invariant. O(n); for tests and fsck.
  Status CheckInvariants() const;

 private:
  // The extents in lblk order, cut into leaves of at most leaf_capacity_
  // (and, but for the last one standing, at least a quarter of it);
  // firsts_[i] is leaves_[i].front().lblk. A lookup is a binary search of
  // firsts_, small and hot in cache, then one of a single contiguous leaf:
  // a handful of cache misses where a balanced tree of the 100k extents a
  // randomly written file reaches takes ~20 dependent ones.
  struct Pos {
    size_t leaf = 0;
    size_t slot = 0;
  };
  // A mutation of [lo, hi) can only change keys in [start of the extent
  // before lo, hi]: that extent may shrink or absorb a merge, one at hi may
  // merge. The mutation rewrites that window as a whole; comparing it before
  // and after yields the exact delta.
  struct Window {
    Pos from;                   // where `before` starts (or would)
    std::vector<Extent> before;
  };
  Window TakeWindow(uint64_t lo, uint64_t hi) const;
  void Replace(const Window& w, const std::vector<Extent>& after);
  static void Diff(const std::vector<Extent>& before, const std::vector<Extent>& after, ExtentDelta* delta);

  // The last extent with lblk <= key, if any.
  bool Floor(uint64_t key, Pos* out) const;
  const Extent& At(Pos p) const { return leaves_[p.leaf][p.slot]; }
  bool Valid(Pos p) const { return p.leaf < leaves_.size(); }
  Pos Next(Pos p) const;
  // Restores the leaf bounds after leaf i changed size.
  void Rebalance(size_t i);

  size_t leaf_capacity_;
  std::vector<std::vector<Extent>> leaves_;
  std::vector<uint64_t> firsts_;
  size_t size_ = 0;
  uint64_t mapped_blocks_ = 0;
  uint64_t last_pblk_hint_ = 0;
};

}  // namespace deferfs
