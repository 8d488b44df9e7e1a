#include "fs/iomap.h"

#include <algorithm>

namespace deferfs {

Status IomapOps::Begin(Inode* inode, uint64_t pos, uint64_t len, unsigned flags, Iomap* out) {
  const uint64_t lblk = pos >> kBlockShift;
  uint64_t nblk = (len + kBlockSize - 1) >> kBlockShift;
  *out = Iomap{};
  out->offset = pos;
  if (inode->meta_epoch > synced_epoch_->load(std::memory_order_acquire)) out->flags |= IOMAP_F_DIRTY;

  // An in-flight allocation covering lblk reads as a hole (its data is not
  // written yet) and makes a write wait.
  auto& inflight = inode->new_extents;
  auto it = inflight.upper_bound(lblk);
  if (it != inflight.begin()) {
    auto prev = std::prev(it);
    if (lblk < prev->first + prev->second.len) {
      if (flags & IOMAP_WRITE) return Status::Error(EAGAIN, "overlaps an in-flight allocation");
      out->length = std::min(nblk, prev->first + prev->second.len - lblk) << kBlockShift;
      return Status::Ok();
    }
  }
  if (it != inflight.end()) nblk = std::min(nblk, it->first - lblk);

  Extent e;
  uint64_t hole = 0;
  if (inode->extents.Find(lblk, &e, &hole)) {
    out->length = std::min(nblk, e.len) << kBlockShift;
    out->addr = e.pblk << kBlockShift;
    out->type = e.state == ExtentState::kWritten ? Iomap::MAPPED : Iomap::UNWRITTEN;
    return Status::Ok();
  }
  nblk = std::min(nblk, hole);
  if (!(flags & IOMAP_WRITE)) {
    out->length = nblk << kBlockShift;
    return Status::Ok();
  }

  // Locality: continue right after the file's most recent allocation.
  uint64_t goal = inode->extents.last_pblk_hint();
  if (!inflight.empty()) goal = std::max(goal, std::prev(inflight.end())->second.start + std::prev(inflight.end())->second.len);
  BlockRange r;
  Status st = alloc_->Allocate(goal, nblk, &r);
  if (st.err() == ENOSPC && reclaim_ && reclaim_()) st = alloc_->Allocate(goal, nblk, &r);
  if (!st.ok()) return st;
  inflight[lblk] = r;
  out->length = r.len << kBlockShift;
  out->addr = r.start << kBlockShift;
  out->type = Iomap::UNWRITTEN;
  out->flags |= IOMAP_F_NEW;
  return Status::Ok();
}

}  // namespace deferfs
