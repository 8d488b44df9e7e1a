#include "backend/allocator.h"

#include <algorithm>
#include <cassert>
#include <iterator>
#include <string>

namespace deferfs {

namespace {

std::string RangeStr(uint64_t start, uint64_t len) {
  return "[" + std::to_string(start) + ", " + std::to_string(start + len) + ")";
}

// Removes [start, start + len) from the free extent at `it`, which holds it.
// Re-keys the node instead of erase + insert when the head is taken, so the
// common append-allocation path never allocates.
void Take(std::map<uint64_t, uint64_t>& free, std::map<uint64_t, uint64_t>::iterator it,
          uint64_t start, uint64_t len) {
  const uint64_t fs = it->first;
  const uint64_t fe = fs + it->second;
  const uint64_t end = start + len;
  assert(fs <= start && end <= fe);
  if (start > fs) {
    it->second = start - fs;
    if (end < fe) free.emplace_hint(std::next(it), end, fe - end);
  } else if (end == fe) {
    free.erase(it);
  } else {
    auto hint = std::next(it);
    auto node = free.extract(it);
    node.key() = end;
    node.mapped() = fe - end;
    free.insert(hint, std::move(node));
  }
}

}  // namespace

Allocator::Allocator(uint64_t first, uint64_t end) : first_(first), end_(std::max(first, end)) {
  assert(first <= end);
  if (end_ > first_) {
    free_.emplace(first_, end_ - first_);
    free_blocks_ = end_ - first_;
  }
}

Status Allocator::MarkUsed(BlockRange r) {
  if (r.len == 0 || r.start < first_ || r.start >= end_ || r.len > end_ - r.start) {
    return Status::Invalid("extent at device blocks " + RangeStr(r.start, r.len) +
                           " is empty or outside the data area " +
                           RangeStr(first_, end_ - first_) + ": metadata is corrupt, run fsck");
  }
  std::lock_guard lock(mu_);
  auto it = free_.upper_bound(r.start);
  // Only the free extent starting at or before r.start can hold all of r.
  if (it == free_.begin() || std::prev(it)->first + std::prev(it)->second < r.start + r.len) {
    return Status::Invalid("device blocks " + RangeStr(r.start, r.len) +
                           " are claimed by two extents: metadata is corrupt, run fsck");
  }
  Take(free_, std::prev(it), r.start, r.len);
  free_blocks_ -= r.len;
  return Status::Ok();
}

Status Allocator::Allocate(uint64_t goal, uint64_t want, BlockRange* out) {
  if (want == 0) return Status::Invalid("Allocate of 0 blocks");
  std::lock_guard lock(mu_);
  if (free_.empty()) {
    return Status::NoSpace("device is full: 0 of " + std::to_string(total_blocks()) +
                           " blocks free");
  }
  auto it = free_.upper_bound(goal);
  if (it != free_.begin()) {
    auto prev = std::prev(it);
    const uint64_t fe = prev->first + prev->second;
    if (goal < fe) {  // goal itself is free
      *out = {goal, std::min(want, fe - goal)};
      Take(free_, prev, out->start, out->len);
      free_blocks_ -= out->len;
      return Status::Ok();
    }
  }
  if (it == free_.end()) it = free_.begin();  // wrap around
  *out = {it->first, std::min(want, it->second)};
  Take(free_, it, out->start, out->len);
  free_blocks_ -= out->len;
  return Status::Ok();
}

void Allocator::Free(BlockRange r) {
  if (r.len == 0) return;
  const bool in_range = r.start >= first_ && r.start < end_ && r.len <= end_ - r.start;
  assert(in_range && "Allocator::Free of blocks outside the device");
  if (!in_range) return;

  std::lock_guard lock(mu_);
  const uint64_t end = r.start + r.len;
  auto next = free_.lower_bound(r.start);
  auto prev = next == free_.begin() ? free_.end() : std::prev(next);
  const bool double_free = (next != free_.end() && next->first < end) ||
                           (prev != free_.end() && prev->first + prev->second > r.start);
  assert(!double_free && "Allocator::Free of blocks that are already free");
  if (double_free) return;

  const bool merge_prev = prev != free_.end() && prev->first + prev->second == r.start;
  const bool merge_next = next != free_.end() && next->first == end;
  if (merge_prev) {
    prev->second += r.len;
    if (merge_next) {
      prev->second += next->second;
      free_.erase(next);
    }
  } else if (merge_next) {
    auto hint = std::next(next);
    auto node = free_.extract(next);
    node.key() = r.start;
    node.mapped() += r.len;
    free_.insert(hint, std::move(node));
  } else {
    free_.emplace_hint(next, r.start, r.len);
  }
  free_blocks_ += r.len;
}

uint64_t Allocator::free_blocks() const {
  std::lock_guard lock(mu_);
  return free_blocks_;
}

}  // namespace deferfs
