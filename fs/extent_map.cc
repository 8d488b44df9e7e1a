#include "fs/extent_map.h"

#include <algorithm>
#include <cassert>
#include <iterator>
#include <string>

namespace deferfs {

namespace {

uint64_t End(const Extent& e) { return e.lblk + e.len; }

bool Mergeable(const Extent& a, const Extent& b) {
  return End(a) == b.lblk && a.pblk + a.len == b.pblk && a.state == b.state;
}

std::string Describe(const Extent& e) {
  return "[" + std::to_string(e.lblk) + ", " + std::to_string(End(e)) + ") -> " +
         std::to_string(e.pblk) + (e.state == ExtentState::kWritten ? " written" : " unwritten");
}

// Appends r minus [keep.start, keep.start + keep.len) to out.
void AppendExcept(BlockRange r, BlockRange keep, std::vector<BlockRange>* out) {
  const uint64_t r_end = r.start + r.len;
  const uint64_t k_end = keep.start + keep.len;
  if (keep.start > r.start) out->push_back({r.start, std::min(r_end, keep.start) - r.start});
  if (k_end < r_end) {
    const uint64_t from = std::max(r.start, k_end);
    out->push_back({from, r_end - from});
  }
}

}  // namespace

void ExtentMap::Load(const Extent& e) {
  assert(e.len > 0);
  auto [it, inserted] = map_.emplace(e.lblk, e);
  assert(inserted);
  if (!inserted) return;
  assert(it == map_.begin() || End(std::prev(it)->second) <= e.lblk);
  assert(std::next(it) == map_.end() || End(e) <= std::next(it)->first);
  mapped_blocks_ += e.len;
  last_pblk_hint_ = e.pblk + e.len;
}

bool ExtentMap::Find(uint64_t lblk, Extent* out, uint64_t* hole_len) const {
  auto it = map_.upper_bound(lblk);
  if (it != map_.begin()) {
    const Extent& e = std::prev(it)->second;
    if (lblk < End(e)) {
      *out = {lblk, End(e) - lblk, e.pblk + (lblk - e.lblk), e.state};
      return true;
    }
  }
  *hole_len = it == map_.end() ? UINT64_MAX : it->first - lblk;
  return false;
}

bool ExtentMap::NextAfter(uint64_t lblk, Extent* out) const {
  auto it = map_.upper_bound(lblk);
  if (it != map_.begin() && End(std::prev(it)->second) > lblk) --it;
  if (it == map_.end()) return false;
  *out = it->second;
  return true;
}

void ExtentMap::ForEach(const std::function<void(const Extent&)>& fn) const {
  for (const auto& [lblk, e] : map_) fn(e);
}

void ExtentMap::Insert(const Extent& e, ExtentDelta* delta) {
  assert(e.len > 0 && End(e) > e.lblk);
  if (e.len == 0) return;
  const uint64_t end = End(e);
  const uint64_t wlo = WindowStart(e.lblk);
  const std::vector<Extent> before = Snapshot(wlo, end);

  std::vector<BlockRange> freed;
  Carve(e.lblk, end, &freed);
  auto it = MergePrev(map_.emplace(e.lblk, e).first);
  mapped_blocks_ += e.len;
  if (std::next(it) != map_.end()) MergePrev(std::next(it));
  last_pblk_hint_ = e.pblk + e.len;

  // Re-inserting blocks that were mapped here (e.g. a state change done as
  // an Insert) must not hand them to the allocator.
  for (BlockRange r : freed) AppendExcept(r, {e.pblk, e.len}, &delta->freed);
  Diff(before, wlo, end, delta);
}

void ExtentMap::Punch(uint64_t lblk, uint64_t len, ExtentDelta* delta) {
  len = std::min(len, UINT64_MAX - lblk);  // "to the end of the file"
  if (len == 0) return;
  const uint64_t end = lblk + len;
  const uint64_t wlo = WindowStart(lblk);
  const std::vector<Extent> before = Snapshot(wlo, end);
  Carve(lblk, end, &delta->freed);
  Diff(before, wlo, end, delta);
}

void ExtentMap::Convert(uint64_t lblk, uint64_t len, ExtentDelta* delta) {
  len = std::min(len, UINT64_MAX - lblk);
  if (len == 0) return;
  const uint64_t end = lblk + len;
  const uint64_t wlo = WindowStart(lblk);
  const std::vector<Extent> before = Snapshot(wlo, end);

  auto it = map_.upper_bound(lblk);
  if (it != map_.begin() && End(std::prev(it)->second) > lblk) --it;
  // Merging is only tried next to a converted extent: elsewhere the map was
  // already merged, and a Load()ed map must not be rewritten outside range.
  bool converted = false;
  for (; it != map_.end() && it->first < end; ++it) {
    if (it->second.state == ExtentState::kUnwritten) {
      if (it->first < lblk) it = SplitAt(it, lblk);
      if (End(it->second) > end) SplitAt(it, end);
      it->second.state = ExtentState::kWritten;
      it = MergePrev(it);
      converted = true;
    } else if (converted) {
      it = MergePrev(it);
      converted = false;
    }
  }
  if (converted && it != map_.end()) MergePrev(it);
  Diff(before, wlo, end, delta);
}

Status ExtentMap::CheckInvariants() const {
  uint64_t total = 0;
  const Extent* prev = nullptr;
  for (const auto& [key, e] : map_) {
    const char* bad = nullptr;
    if (key != e.lblk) {
      bad = "is stored under another key";
    } else if (e.len == 0) {
      bad = "is empty";
    } else if (End(e) < e.lblk || e.pblk + e.len < e.pblk) {
      bad = "wraps around";
    } else if (prev != nullptr && End(*prev) > e.lblk) {
      bad = "overlaps the previous extent";
    } else if (prev != nullptr && Mergeable(*prev, e)) {
      bad = "should be merged with the previous extent";
    }
    if (bad != nullptr) return Status::Invalid("extent " + Describe(e) + " " + bad);
    total += e.len;
    prev = &e;
  }
  if (total != mapped_blocks_) {
    return Status::Invalid("extents map " + std::to_string(total) + " blocks, counter says " +
                           std::to_string(mapped_blocks_));
  }
  return Status::Ok();
}

ExtentMap::Map::iterator ExtentMap::SplitAt(Map::iterator it, uint64_t lblk) {
  Extent& left = it->second;
  assert(left.lblk < lblk && lblk < End(left));
  const uint64_t head = lblk - left.lblk;
  const Extent right{lblk, left.len - head, left.pblk + head, left.state};
  left.len = head;
  return map_.emplace_hint(std::next(it), lblk, right);
}

ExtentMap::Map::iterator ExtentMap::MergePrev(Map::iterator it) {
  if (it == map_.begin()) return it;
  auto prev = std::prev(it);
  if (!Mergeable(prev->second, it->second)) return it;
  prev->second.len += it->second.len;
  map_.erase(it);
  return prev;
}

void ExtentMap::Carve(uint64_t lo, uint64_t hi, std::vector<BlockRange>* freed) {
  auto it = map_.lower_bound(lo);
  if (it != map_.begin()) {
    Extent& p = std::prev(it)->second;
    if (End(p) > lo) {
      if (End(p) > hi) SplitAt(std::prev(it), hi);
      const uint64_t cut = End(p) - lo;
      freed->push_back({p.pblk + (lo - p.lblk), cut});
      p.len -= cut;
      mapped_blocks_ -= cut;
    }
  }
  while (it != map_.end() && it->first < hi) {
    Extent& e = it->second;
    const uint64_t cut = std::min(End(e), hi) - e.lblk;
    freed->push_back({e.pblk, cut});
    mapped_blocks_ -= cut;
    if (cut == e.len) {
      it = map_.erase(it);
      continue;
    }
    // The tail survives: re-key its node to hi rather than reallocate.
    auto node = map_.extract(it++);
    node.key() = hi;
    node.mapped() = {hi, node.mapped().len - cut, node.mapped().pblk + cut, node.mapped().state};
    map_.insert(it, std::move(node));
    break;
  }
}

uint64_t ExtentMap::WindowStart(uint64_t lblk) const {
  auto it = map_.lower_bound(lblk);
  return it == map_.begin() ? lblk : std::prev(it)->first;
}

std::vector<Extent> ExtentMap::Snapshot(uint64_t lo, uint64_t hi) const {
  std::vector<Extent> out;
  for (auto it = map_.lower_bound(lo); it != map_.end() && it->first <= hi; ++it) {
    out.push_back(it->second);
  }
  return out;
}

void ExtentMap::Diff(const std::vector<Extent>& before, uint64_t lo, uint64_t hi,
                     ExtentDelta* delta) const {
  const size_t old_removed = delta->removed.size();
  const size_t old_upserted = delta->upserted.size();
  auto b = before.begin();
  for (auto it = map_.lower_bound(lo); it != map_.end() && it->first <= hi; ++it) {
    for (; b != before.end() && b->lblk < it->first; ++b) delta->removed.push_back(b->lblk);
    if (b != before.end() && b->lblk == it->first) {
      if (*b != it->second) delta->upserted.push_back(it->second);
      ++b;
    } else {
      delta->upserted.push_back(it->second);
    }
  }
  for (; b != before.end(); ++b) delta->removed.push_back(b->lblk);
  if (old_removed == 0 && old_upserted == 0) return;

  // An accumulated delta: this operation's word on a key replaces any
  // earlier entry for it, so "removed, then upserted" stays exact.
  std::vector<uint64_t> keys(delta->removed.begin() + old_removed, delta->removed.end());
  for (size_t i = old_upserted; i < delta->upserted.size(); i++) {
    keys.push_back(delta->upserted[i].lblk);
  }
  std::sort(keys.begin(), keys.end());
  auto touched = [&keys](uint64_t k) { return std::binary_search(keys.begin(), keys.end(), k); };
  auto rm_old = delta->removed.begin() + old_removed;
  delta->removed.erase(std::remove_if(delta->removed.begin(), rm_old, touched), rm_old);
  auto up_old = delta->upserted.begin() + old_upserted;
  delta->upserted.erase(std::remove_if(delta->upserted.begin(), up_old,
                                       [&](const Extent& e) { return touched(e.lblk); }),
                        up_old);
}

}  // namespace deferfs
