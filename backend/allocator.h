// Allocator: the device's free space, in 4 KiB blocks.
// Free space is not persisted: at mount every block starts free and the
// caller rebuilds the used set with MarkUsed over all persisted extents.
// A reservation for an in-flight write is an allocated range not committed
// yet; the caller frees it if the write fails.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>

#include "backend/status.h"

namespace deferfs {

// [start, start + len) in device blocks.
struct BlockRange {
  uint64_t start = 0;
  uint64_t len = 0;
};

// Free-extent allocator over device blocks [first, end), near-goal first.
// Thread-safe: one internal mutex; every call is O(log free extents).
class Allocator {
 public:
  // All blocks in [first, end) start free.
  Allocator(uint64_t first, uint64_t end);

  Allocator(const Allocator&) = delete;
  Allocator& operator=(const Allocator&) = delete;

  // Marks a persisted extent used. EINVAL naming the range if any block of it
  // is outside [first, end) or already used: the metadata is corrupt.
  Status MarkUsed(BlockRange r);

  // Allocates 1..want contiguous blocks: from goal if goal is free, else from
  // the next free range after goal, wrapping around to the start. Returns the
  // whole piece available there, up to want; ENOSPC only if nothing is free.
  Status Allocate(uint64_t goal, uint64_t want, BlockRange* out);

  // Returns allocated blocks. Freeing a free or out-of-range block is a bug:
  // asserts in debug builds, is ignored (the whole call) otherwise.
  void Free(BlockRange r);

  uint64_t free_blocks() const;
  uint64_t total_blocks() const { return end_ - first_; }

 private:
  const uint64_t first_;
  const uint64_t end_;

  mutable std::mutex mu_;
  // start -> len of each free extent. Disjoint and never adjacent: Free
  // merges, so a free run is always one entry and Allocate sees all of it.
  std::map<uint64_t, uint64_t> free_;
  uint64_t free_blocks_ = 0;
};

}  // namespace deferfs
