#include "fs/extent_map.h"

#include <algorithm>
#include <cassert>
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

// The window's extents with [lo, hi) cut out; appends the blocks cut to *cut.
std::vector<Extent> CutOut(const std::vector<Extent>& window, uint64_t lo, uint64_t hi,
                           std::vector<BlockRange>* cut) {
  std::vector<Extent> out;
  out.reserve(window.size() + 2);
  for (const Extent& e : window) {
    if (End(e) <= lo || e.lblk >= hi) {
      out.push_back(e);
      continue;
    }
    if (e.lblk < lo) out.push_back({e.lblk, lo - e.lblk, e.pblk, e.state});
    const uint64_t from = std::max(lo, e.lblk);
    const uint64_t to = std::min(hi, End(e));
    cut->push_back({e.pblk + (from - e.lblk), to - from});
    if (End(e) > hi) out.push_back({hi, End(e) - hi, e.pblk + (hi - e.lblk), e.state});
  }
  return out;
}

// A window's new contents, built in lblk order. A piece merges into the one
// before it only if one of the two is `fresh` (made by the operation):
// elsewhere the map was merged already, and a Load()ed map must not be
// rewritten outside the range an operation changes.
class WindowWriter {
 public:
  explicit WindowWriter(size_t expect) { out_.reserve(expect); }
  void Add(const Extent& x, bool fresh) {
    if (!out_.empty() && (fresh || back_fresh_) && Mergeable(out_.back(), x)) {
      out_.back().len += x.len;
    } else {
      out_.push_back(x);
    }
    back_fresh_ = fresh;
  }
  std::vector<Extent> Take() { return std::move(out_); }

 private:
  std::vector<Extent> out_;
  bool back_fresh_ = false;
};

uint64_t Blocks(const std::vector<BlockRange>& ranges) {
  uint64_t n = 0;
  for (const BlockRange& r : ranges) n += r.len;
  return n;
}

}  // namespace

ExtentMap::ExtentMap(size_t leaf_capacity) : leaf_capacity_(std::max<size_t>(leaf_capacity, 4)) {}

void ExtentMap::Load(const Extent& e) {
  assert(e.len > 0);
  Pos p;
  const bool after = Floor(e.lblk, &p);
  assert(!after || At(p).lblk != e.lblk);
  if (after && At(p).lblk == e.lblk) return;
  assert(!after || End(At(p)) <= e.lblk);
  if (leaves_.empty()) {
    leaves_.emplace_back();
    firsts_.push_back(e.lblk);
  }
  // Mount-time loads come in key order: appended to the last leaf.
  const Pos at = after ? Pos{p.leaf, p.slot + 1} : Pos{0, 0};
  std::vector<Extent>& leaf = leaves_[at.leaf];
  assert(at.slot < leaf.size() ? e.lblk + e.len <= leaf[at.slot].lblk
                               : at.leaf + 1 >= leaves_.size() || e.lblk + e.len <= firsts_[at.leaf + 1]);
  leaf.insert(leaf.begin() + static_cast<ptrdiff_t>(at.slot), e);
  Rebalance(at.leaf);
  size_++;
  mapped_blocks_ += e.len;
  last_pblk_hint_ = e.pblk + e.len;
}

bool ExtentMap::Floor(uint64_t key, Pos* out) const {
  auto f = std::upper_bound(firsts_.begin(), firsts_.end(), key);
  if (f == firsts_.begin()) return false;
  const size_t i = static_cast<size_t>(f - firsts_.begin()) - 1;
  const std::vector<Extent>& leaf = leaves_[i];
  // firsts_[i] <= key: the leaf's first extent qualifies, so s > begin.
  auto s = std::upper_bound(leaf.begin(), leaf.end(), key,
                            [](uint64_t k, const Extent& e) { return k < e.lblk; });
  *out = {i, static_cast<size_t>(s - leaf.begin()) - 1};
  return true;
}

ExtentMap::Pos ExtentMap::Next(Pos p) const {
  if (++p.slot < leaves_[p.leaf].size()) return p;
  return {p.leaf + 1, 0};
}

bool ExtentMap::Find(uint64_t lblk, Extent* out, uint64_t* hole_len) const {
  Pos p;
  Pos next{0, 0};
  if (Floor(lblk, &p)) {
    const Extent& e = At(p);
    if (lblk < End(e)) {
      *out = {lblk, End(e) - lblk, e.pblk + (lblk - e.lblk), e.state};
      return true;
    }
    next = Next(p);
  }
  *hole_len = Valid(next) ? At(next).lblk - lblk : UINT64_MAX;
  return false;
}

bool ExtentMap::NextAfter(uint64_t lblk, Extent* out) const {
  Pos p;
  Pos next{0, 0};
  if (Floor(lblk, &p)) next = End(At(p)) > lblk ? p : Next(p);
  if (!Valid(next)) return false;
  *out = At(next);
  return true;
}

void ExtentMap::ForEach(const std::function<void(const Extent&)>& fn) const {
  for (const auto& leaf : leaves_) {
    for (const Extent& e : leaf) fn(e);
  }
}

void ExtentMap::Insert(const Extent& e, ExtentDelta* delta) {
  assert(e.len > 0 && End(e) > e.lblk);
  if (e.len == 0) return;
  const uint64_t end = End(e);
  const Window w = TakeWindow(e.lblk, end);
  std::vector<BlockRange> freed;
  const std::vector<Extent> rest = CutOut(w.before, e.lblk, end, &freed);
  // e goes where the cut was: after the pieces before it, before those at end.
  WindowWriter out(rest.size() + 1);
  bool placed = false;
  for (const Extent& x : rest) {
    if (!placed && x.lblk >= end) {
      out.Add(e, true);
      placed = true;
    }
    out.Add(x, false);
  }
  if (!placed) out.Add(e, true);
  const std::vector<Extent> after = out.Take();
  Replace(w, after);
  mapped_blocks_ = mapped_blocks_ - Blocks(freed) + e.len;
  last_pblk_hint_ = e.pblk + e.len;

  // Re-inserting blocks that were mapped here (e.g. a state change done as
  // an Insert) must not hand them to the allocator.
  for (BlockRange r : freed) AppendExcept(r, {e.pblk, e.len}, &delta->freed);
  Diff(w.before, after, delta);
}

void ExtentMap::Punch(uint64_t lblk, uint64_t len, ExtentDelta* delta) {
  len = std::min(len, UINT64_MAX - lblk);  // "to the end of the file"
  if (len == 0) return;
  const uint64_t end = lblk + len;
  const Window w = TakeWindow(lblk, end);
  std::vector<BlockRange> cut;
  const std::vector<Extent> after = CutOut(w.before, lblk, end, &cut);
  if (after != w.before) Replace(w, after);
  mapped_blocks_ -= Blocks(cut);
  delta->freed.insert(delta->freed.end(), cut.begin(), cut.end());
  Diff(w.before, after, delta);
}

void ExtentMap::Convert(uint64_t lblk, uint64_t len, ExtentDelta* delta, ExtentState to) {
  len = std::min(len, UINT64_MAX - lblk);
  if (len == 0) return;
  const uint64_t end = lblk + len;
  const Window w = TakeWindow(lblk, end);
  WindowWriter out(w.before.size() + 2);
  for (const Extent& e : w.before) {
    if (e.state == to || End(e) <= lblk || e.lblk >= end) {
      out.Add(e, false);
      continue;
    }
    if (e.lblk < lblk) out.Add({e.lblk, lblk - e.lblk, e.pblk, e.state}, false);
    const uint64_t from = std::max(lblk, e.lblk);
    const uint64_t until = std::min(end, End(e));
    out.Add({from, until - from, e.pblk + (from - e.lblk), to}, true);
    if (End(e) > end) out.Add({end, End(e) - end, e.pblk + (end - e.lblk), e.state}, false);
  }
  const std::vector<Extent> after = out.Take();
  if (after != w.before) Replace(w, after);
  Diff(w.before, after, delta);
}

Status ExtentMap::CheckInvariants() const {
  if (firsts_.size() != leaves_.size()) return Status::Invalid("extent map's leaf index has the wrong size");
  uint64_t total = 0;
  size_t count = 0;
  const Extent* prev = nullptr;
  for (size_t i = 0; i < leaves_.size(); i++) {
    const std::vector<Extent>& leaf = leaves_[i];
    if (leaf.empty() || leaf.size() > leaf_capacity_ || (leaf.size() < leaf_capacity_ / 4 && leaves_.size() > 1)) {
      return Status::Invalid("extent map leaf " + std::to_string(i) + " holds " + std::to_string(leaf.size()) +
                             " extents, outside its bounds");
    }
    if (firsts_[i] != leaf.front().lblk) {
      return Status::Invalid("extent map leaf " + std::to_string(i) + " is indexed under another key");
    }
    for (const Extent& e : leaf) {
      const char* bad = nullptr;
      if (e.len == 0) {
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
      count++;
      prev = &e;
    }
  }
  if (count != size_) {
    return Status::Invalid("extent map counts " + std::to_string(size_) + " extents, holds " + std::to_string(count));
  }
  if (total != mapped_blocks_) {
    return Status::Invalid("extents map " + std::to_string(total) + " blocks, counter says " +
                           std::to_string(mapped_blocks_));
  }
  return Status::Ok();
}

ExtentMap::Window ExtentMap::TakeWindow(uint64_t lo, uint64_t hi) const {
  Window w;
  Pos p;
  // From the last extent before lo, or else the first one.
  if (!(lo > 0 && Floor(lo - 1, &p))) p = {0, 0};
  w.from = p;
  for (; Valid(p) && At(p).lblk <= hi; p = Next(p)) w.before.push_back(At(p));
  return w;
}

void ExtentMap::Replace(const Window& w, const std::vector<Extent>& after) {
  size_ = size_ - w.before.size() + after.size();
  if (leaves_.empty()) {
    if (after.empty()) return;
    leaves_.push_back(after);
    firsts_.push_back(after.front().lblk);
    Rebalance(0);
    return;
  }
  // The window's extents run from w.from over one leaf or, rarely (a long
  // punch, a window across a leaf edge), several.
  size_t last = w.from.leaf;
  size_t end_slot = w.from.slot;
  for (size_t left = w.before.size(), slot = w.from.slot;;) {
    const size_t take = std::min(left, leaves_[last].size() - slot);
    left -= take;
    end_slot = slot + take;
    if (left == 0) break;
    last++;
    slot = 0;
  }
  if (last == w.from.leaf) {
    std::vector<Extent>& leaf = leaves_[last];
    const auto at = leaf.begin() + static_cast<ptrdiff_t>(w.from.slot);
    const size_t n = w.before.size();
    const size_t common = std::min(n, after.size());
    std::copy(after.begin(), after.begin() + static_cast<ptrdiff_t>(common), at);
    if (n > common) {
      leaf.erase(at + static_cast<ptrdiff_t>(common), at + static_cast<ptrdiff_t>(n));
    } else {
      leaf.insert(at + static_cast<ptrdiff_t>(common), after.begin() + static_cast<ptrdiff_t>(common), after.end());
    }
    Rebalance(last);
    return;
  }
  std::vector<Extent> merged(leaves_[w.from.leaf].begin(),
                             leaves_[w.from.leaf].begin() + static_cast<ptrdiff_t>(w.from.slot));
  merged.insert(merged.end(), after.begin(), after.end());
  merged.insert(merged.end(), leaves_[last].begin() + static_cast<ptrdiff_t>(end_slot), leaves_[last].end());
  // Spread over as many leaves as the window spanned where their bounds
  // allow (the usual case, a window across one leaf edge): the leaves are
  // refilled in place, and the index shifts only when their count changes.
  const size_t spanned = last - w.from.leaf + 1;
  size_t chunks = (merged.size() + leaf_capacity_ - 1) / leaf_capacity_;
  if (chunks < spanned && merged.size() / spanned >= leaf_capacity_ / 4) chunks = spanned;
  const auto keep = static_cast<ptrdiff_t>(w.from.leaf + std::min(chunks, spanned));
  if (chunks < spanned) {
    const auto end = static_cast<ptrdiff_t>(last + 1);
    leaves_.erase(leaves_.begin() + keep, leaves_.begin() + end);
    firsts_.erase(firsts_.begin() + keep, firsts_.begin() + end);
  } else if (chunks > spanned) {
    leaves_.insert(leaves_.begin() + keep, chunks - spanned, {});
    firsts_.insert(firsts_.begin() + keep, chunks - spanned, 0);
  }
  for (size_t c = 0, from = 0; c < chunks; c++) {
    const size_t to = merged.size() * (c + 1) / chunks;
    const size_t i = w.from.leaf + c;
    leaves_[i].assign(merged.begin() + static_cast<ptrdiff_t>(from), merged.begin() + static_cast<ptrdiff_t>(to));
    firsts_[i] = merged[from].lblk;
    from = to;
  }
  if (chunks == 0) {
    // The window emptied its leaves: the neighbour now at w.from.leaf, or the one before, may be below its bound.
    if (w.from.leaf < leaves_.size()) Rebalance(w.from.leaf);
    else if (!leaves_.empty()) Rebalance(leaves_.size() - 1);
    return;
  }
  Rebalance(w.from.leaf);
}

void ExtentMap::Rebalance(size_t i) {
  std::vector<Extent>& leaf = leaves_[i];
  if (leaf.empty()) {
    leaves_.erase(leaves_.begin() + static_cast<ptrdiff_t>(i));
    firsts_.erase(firsts_.begin() + static_cast<ptrdiff_t>(i));
    if (!leaves_.empty()) Rebalance(std::min(i, leaves_.size() - 1));
    return;
  }
  firsts_[i] = leaf.front().lblk;
  if (leaf.size() > leaf_capacity_) {
    std::vector<Extent> right;
    right.reserve(leaf_capacity_ + 1);
    right.assign(leaf.begin() + static_cast<ptrdiff_t>(leaf.size() / 2), leaf.end());
    leaf.resize(leaf.size() / 2);
    firsts_.insert(firsts_.begin() + static_cast<ptrdiff_t>(i) + 1, right.front().lblk);
    leaves_.insert(leaves_.begin() + static_cast<ptrdiff_t>(i) + 1, std::move(right));
    return;
  }
  if (leaf.size() < leaf_capacity_ / 4 && leaves_.size() > 1) {
    // Too small: join a neighbour (and split again if that overflows).
    const size_t a = i + 1 < leaves_.size() ? i : i - 1;
    std::vector<Extent>& left = leaves_[a];
    left.insert(left.end(), leaves_[a + 1].begin(), leaves_[a + 1].end());
    leaves_.erase(leaves_.begin() + static_cast<ptrdiff_t>(a) + 1);
    firsts_.erase(firsts_.begin() + static_cast<ptrdiff_t>(a) + 1);
    Rebalance(a);
  }
}

void ExtentMap::Diff(const std::vector<Extent>& before, const std::vector<Extent>& after, ExtentDelta* delta) {
  const size_t old_removed = delta->removed.size();
  const size_t old_upserted = delta->upserted.size();
  auto b = before.begin();
  for (const Extent& a : after) {
    for (; b != before.end() && b->lblk < a.lblk; ++b) delta->removed.push_back(b->lblk);
    if (b != before.end() && b->lblk == a.lblk) {
      if (*b != a) delta->upserted.push_back(a);
      ++b;
    } else {
      delta->upserted.push_back(a);
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
