// The data path above the dio engine: open/release, read and write (aligned
// requests straight to the engine, unaligned ones read-modify-write),
// truncate, fallocate, lseek, fsync, and the write end_io that the engine
// calls to finish a write.
#include <fcntl.h>
#include <linux/falloc.h>

#include <cstring>

#include "fs/filesystem.h"

namespace deferfs {
namespace {

constexpr uint64_t kB = kBlockSize;
uint64_t RoundDown(uint64_t v) { return v & ~(kB - 1); }
uint64_t RoundUp(uint64_t v) { return (v + kB - 1) & ~(kB - 1); }
bool Aligned(uint64_t v) { return (v & (kB - 1)) == 0; }

// Whether growing to `new_size` needs ZeroPastEof first. Caller holds mu.
bool TailNeedsZeroing(const Inode& inode, uint64_t new_size) {
  const uint64_t size = inode.rec.size;
  return new_size > size && !Aligned(size) && inode.zeroed_past != size;
}

}  // namespace

uint64_t Filesystem::ReadSpan(uint64_t pos, uint64_t len) { return RoundUp(pos + len) - RoundDown(pos); }

Status Filesystem::EnsureExtents(Inode* inode) {
  if (inode->extents_loaded || !inode->is_reg()) return Status::Ok();
  Status inner;
  DEFERFS_RETURN_IF_ERROR(meta_->ForEachExtent(inode->ino, [&](const ExtentRecord& r) {
    inode->extents.Load(Extent{r.lblk, r.len, r.pblk, static_cast<ExtentState>(r.state)});
  }));
  inode->extents_loaded = true;
  return Status::Ok();
}

void Filesystem::ApplyDelta(uint64_t ino, const ExtentDelta& d, MetaBatch* b) {
  for (uint64_t lblk : d.removed) b->DeleteExtent(ino, lblk);
  for (const Extent& e : d.upserted) {
    b->PutExtent(ino, ExtentRecord{e.lblk, e.len, e.pblk, static_cast<uint8_t>(e.state)});
  }
}

void Filesystem::FreeBlocksLater(const std::vector<BlockRange>& freed) {
  if (freed.empty()) return;
  std::lock_guard l(free_mu_);
  pending_free_.insert(pending_free_.end(), freed.begin(), freed.end());
}

Status Filesystem::SyncMeta() {
  // Only what was freed before the WAL sync is safe to hand out after it.
  std::vector<BlockRange> ready;
  {
    std::lock_guard l(free_mu_);
    ready.swap(pending_free_);
  }
  const uint64_t epoch = wal_epoch_.fetch_add(1, std::memory_order_acq_rel);  // see EpochAfterCommit
  Status st = CheckLive();
  if (st.ok()) {
    st = meta_->SyncWal();
    if (!st.ok()) st = MetaFailed(st);
  }
  if (!st.ok()) {
    FreeBlocksLater(ready);
    return st;
  }
  uint64_t seen = synced_epoch_.load(std::memory_order_relaxed);
  while (seen < epoch && !synced_epoch_.compare_exchange_weak(seen, epoch, std::memory_order_acq_rel)) {
  }
  for (const BlockRange& r : ready) alloc_->Free(r);
  return Status::Ok();
}

Status Filesystem::CommitInode(Inode* inode, MetaBatch* b, bool sync) {
  sync = sync || opt_.sync;
  DEFERFS_RETURN_IF_ERROR(Commit(b, sync, /*may_defer=*/true));
  // A synced commit makes everything before it in the WAL durable too. An
  // unsynced one is read against the epoch after it landed: conservative.
  inode->meta_epoch = sync ? 0 : EpochAfterCommit(wal_epoch_);
  return Status::Ok();
}

bool Filesystem::ReclaimFreedBlocks() {
  {
    std::lock_guard l(free_mu_);
    if (pending_free_.empty()) return false;
  }
  return SyncMeta().ok();
}

Status Filesystem::Open(uint64_t ino, Inode** out) {
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  {
    std::lock_guard l(inode->mu);
    DEFERFS_RETURN_IF_ERROR(EnsureExtents(inode));
  }
  inode->open_count++;
  *out = inode;
  return Status::Ok();
}

void Filesystem::Release(Inode* inode) {
  // The kernel releases a file only after every request on it was answered,
  // so nothing should be in flight; make sure before the inode may go.
  inode_dio_wait(inode);
  std::lock_guard ns(ns_mu_);
  if (inode->open_count == 0) return;
  inode->open_count--;
  if (inode->open_count == 0) {
    std::lock_guard l(inode->mu);
    // An idle file keeps no block for its next unaligned write. No write is
    // in flight now, and the last one filled the block before its mu section.
    inode->DropRmwBlock();
    inode->rmw_block.reset();
    MetaBatch b;
    std::vector<BlockRange> freed;
    if (inode->rec.nlink == 0) {
      MaybeDestroy(inode, &b, &freed);  // the last close of an unlinked file frees it
    } else if (inode->dirty) {
      b.PutInode(inode->rec);
    }
    if (!b.empty()) {
      if (CommitInode(inode, &b).ok()) {
        inode->dirty = false;
        FreeBlocksLater(freed);
        if (inode->deleted) live_inodes_--;
      } else {
        inode->deleted = false;  // stays an orphan; the next mount frees it
      }
    }
  }
  inodes_.MaybeEvict(inode);
}

ssize_t Filesystem::SyncRw(Inode* inode, bool write, uint64_t pos, IoBuffer* buf, size_t len, uint32_t sync_flags,
                           uint64_t isize) {
  Kiocb k;
  k.inode = inode;
  k.pos = pos;
  k.ki_flags = write ? (IOCB_WRITE | sync_flags | (isize ? 0u : uint32_t{IOCB_NOEXTEND})) : 0u;
  k.ki_isize = isize;
  return engine_->iomap_dio_rw(&k, buf->base, buf->index, len);
}

ssize_t Filesystem::ReadIter(Kiocb* iocb, IoBuffer* buf, size_t len, size_t* data_off) {
  Inode* inode = iocb->inode;
  const uint64_t pos = iocb->pos;
  if (Aligned(pos) && Aligned(len)) {
    *data_off = 0;
    inode->iolock.LockShared();
    ssize_t res = engine_->iomap_dio_rw(iocb, buf->base, buf->index, len);
    inode->iolock.UnlockShared();
    return res;
  }
  // Unaligned: read the covering blocks, hand out the middle.
  const uint64_t start = RoundDown(pos);
  const size_t span = ReadSpan(pos, len);
  if (span > buf->size) return -EINVAL;
  inode->iolock.LockShared();
  ssize_t res = SyncRw(inode, false, start, buf, span);
  inode->iolock.UnlockShared();
  if (res < 0) return res;
  *data_off = pos - start;
  return static_cast<ssize_t>(std::min<uint64_t>(len, static_cast<uint64_t>(res) > *data_off ? res - *data_off : 0));
}

ssize_t Filesystem::WriteIter(Kiocb* iocb, IoBuffer* buf, const uint8_t* data, size_t len) {
  // Even a pure overwrite, which commits nothing: a shut-down or read-only
  // fs takes no data.
  if (opt_.read_only || shut_down()) [[unlikely]] return opt_.read_only ? -EROFS : -EIO;
  Inode* inode = iocb->inode;
  const uint64_t pos = iocb->pos;
  if (Aligned(pos) && Aligned(len) && Aligned(reinterpret_cast<uintptr_t>(data))) {
    inode->iolock.LockShared();
    bool past_partial_block;
    {
      std::lock_guard l(inode->mu);  // file_update_time: persisted lazily
      inode->rec.mtime_ns = inode->rec.ctime_ns = NowNs();
      inode->dirty = true;
      inode->DropRmwBlock();
      past_partial_block = TailNeedsZeroing(*inode, pos);
    }
    if (past_partial_block) [[unlikely]] {
      // That block's tail goes first (ZeroPastEof), alone on the inode.
      inode->iolock.UnlockShared();
      inode->iolock.Lock();
      inode_dio_wait(inode);
      Status z = ZeroPastEof(inode, pos);
      inode->iolock.Unlock();
      if (!z.ok()) return -z.err();
      inode->iolock.LockShared();
    }
    bool in_buf = buf && data >= buf->base && data + len <= buf->base + buf->size;
    ssize_t res = engine_->iomap_dio_rw(iocb, const_cast<uint8_t*>(data), in_buf ? buf->index : -1, len);
    inode->iolock.UnlockShared();
    return res;
  }

  // Unaligned: read-modify-write of the covering blocks, alone on the inode.
  const uint64_t start = RoundDown(pos);
  const uint64_t end = RoundUp(pos + len);
  if (end - start > kIoBufferBytes) return -EINVAL;
  inode->iolock.Lock();
  inode_dio_wait(inode);
  // Only a gap before pos needs it: an append at EOF leaves none.
  if (Status z = ZeroPastEof(inode, pos); !z.ok()) {
    inode->iolock.Unlock();
    return -z.err();
  }
  IoBuffer* bounce = buffers_->Get();
  std::memset(bounce->base, 0, end - start);
  uint64_t cached;
  {
    std::lock_guard l(inode->mu);
    cached = inode->rmw_lblk;
    inode->DropRmwBlock();  // until this write has gone to the device
    inode->rec.mtime_ns = inode->rec.ctime_ns = NowNs();  // file_update_time, as for aligned writes
    inode->dirty = true;
  }
  // Partial head and tail blocks keep their bytes (from the device, or as the
  // last unaligned write left them); fresh blocks get zeros.
  auto read_block = [&](uint64_t at) -> ssize_t {
    uint8_t* dst = bounce->base + (at - start);
    if (at >> kBlockShift == cached) {
      std::memcpy(dst, inode->rmw_block.get(), kB);
      return static_cast<ssize_t>(kB);
    }
    IoBuffer one{dst, kB, bounce->index};
    return SyncRw(inode, false, at, &one, kB);
  };
  ssize_t res = 0;
  if (!Aligned(pos)) res = read_block(start);
  if (res >= 0 && !Aligned(pos + len) && (end - kB != start || Aligned(pos))) res = read_block(end - kB);
  if (res >= 0) {
    std::memcpy(bounce->base + (pos - start), data, len);
    // The blocks, their extents and the new size go in one dio, so that its
    // end_io commits them together: as two commits, a crash between them
    // could keep a written block past EOF, which a later growth would show.
    res = SyncRw(inode, true, start, bounce, end - start, iocb->ki_flags & (IOCB_DSYNC | IOCB_SYNC), pos + len);
  }
  if (res >= 0) {
    if (!inode->rmw_block) inode->rmw_block = std::make_unique<uint8_t[]>(kB);
    std::memcpy(inode->rmw_block.get(), bounce->base + (end - kB - start), kB);
    std::lock_guard l(inode->mu);
    inode->rmw_lblk = (end - kB) >> kBlockShift;
    res = static_cast<ssize_t>(len);
  }
  buffers_->Put(bounce);
  inode->iolock.Unlock();
  return res;
}

int Filesystem::WriteEndIo(std::span<Dio* const> dios) {
  auto nothing_to_do = [](const Dio* d) { return d->pure_overwrite() && d->error.load(std::memory_order_acquire) == 0; };
  if (std::all_of(dios.begin(), dios.end(), nothing_to_do)) return 0;  // the common fast case
  Inode* inode = dios.front()->inode;
  // O_DSYNC data went write-through (FUA bios), so it is on stable media
  // already; the metadata that makes it reachable is committed durably below.
  std::vector<BlockRange> unused;  // allocations of failed writes
  bool woke_waiters = false;
  int ret = 0;
  {
    std::lock_guard l(inode->mu);
    ExtentDelta delta;  // accumulates: one commit for every dio (ExtentMap)
    InodeRecord rec = inode->rec;
    bool any_ok = false, sync_only = false, any_dsync = false, all_dsync = true;
    for (const Dio* dio : dios) {
      if (nothing_to_do(dio)) continue;
      const bool failed = dio->error.load(std::memory_order_acquire) != 0;
      const uint64_t lblk = dio->pos >> kBlockShift;
      const uint64_t end = (dio->pos + dio->size + kB - 1) >> kBlockShift;
      // This write's fresh allocations: into the extent map as written (their
      // data is on the device now), or back to the allocator if it failed.
      // Only this dio's own: a write that failed early must not touch another
      // in-flight write's allocation further along its range.
      for (uint64_t key : dio->new_lblks) {
        auto it = inode->new_extents.find(key);
        if (it == inode->new_extents.end()) continue;
        if (failed) unused.push_back(it->second);
        else inode->extents.Insert(Extent{it->first, it->second.len, it->second.start, ExtentState::kWritten}, &delta);
        inode->new_extents.erase(it);
        woke_waiters = true;
      }
      if (failed) {
        inode->zeroed_past = Inode::kNoSize;  // some of it may have landed past EOF
      } else {
        any_ok = true;
        if (dio->flags & Dio::DIO_NEED_CONVERT) inode->extents.Convert(lblk, end - lblk, &delta);
        if (dio->flags & Dio::DIO_EXTENDING) rec.size = std::max<uint64_t>(rec.size, dio->isize);
        sync_only |= (dio->flags & Dio::DIO_NEED_SYNC) != 0;
      }
      const bool dsync = dio->flags & Dio::DIO_DSYNC;
      any_dsync |= dsync;
      all_dsync &= dsync;
    }
    if (!delta.empty() || rec.size != inode->rec.size || (inode->dirty && any_ok) || sync_only) {
      MetaBatch b;
      ApplyDelta(inode->ino, delta, &b);
      b.PutInode(rec);
      if (any_dsync && all_dsync) b.set_data_durable();  // all FUA: no device flush owed
      Status st = CommitInode(inode, &b, any_dsync);
      if (st.ok()) {
        inode->rec = rec;
        inode->dirty = false;
        FreeBlocksLater(delta.freed);
      } else {
        ret = -st.err();
      }
    }
  }
  for (const BlockRange& r : unused) alloc_->Free(r);  // never persisted: reusable at once
  if (woke_waiters) inode->dio_wq.WakeAll();
  return ret;
}

Status Filesystem::ZeroPartialBlock(Inode* inode, uint64_t from, uint64_t to, bool fua) {
  const uint64_t blk = RoundDown(from);
  {
    std::lock_guard l(inode->mu);
    inode->DropRmwBlock();
    Extent e;
    uint64_t hole;
    if (!inode->extents.Find(blk >> kBlockShift, &e, &hole) || e.state != ExtentState::kWritten) {
      return Status::Ok();  // holes and unwritten blocks already read as zeros
    }
  }
  IoBuffer* buf = buffers_->Get();
  ssize_t res = SyncRw(inode, false, blk, buf, kB);
  if (res >= 0) {
    // A read stops at EOF: what it did not fill is the pool buffer's last
    // use, perhaps another file's, and must not be written back.
    std::memset(buf->base + res, 0, kB - static_cast<uint64_t>(res));
    std::memset(buf->base + (from - blk), 0, to - from);
    res = SyncRw(inode, true, blk, buf, kB, fua ? uint32_t{IOCB_DSYNC} : 0u);
  }
  buffers_->Put(buf);
  return res < 0 ? Status::Error(static_cast<int>(-res), "zeroing a partial block failed") : Status::Ok();
}

// The bytes past EOF in the last block become file data when the size
// grows, and must read as zeros then. Nothing keeps the device's copy of
// them zero: a write that fails after one of its bios landed (the size did
// not move) leaves its data there. So they are zeroed at the growth, as XFS
// does (xfs_zero_eof); a file whose size is block-aligned pays nothing.
// Write-through: the growth may be an O_DSYNC write whose FUA data lets its
// commit skip the device flush, and the zeros must be as durable as it.
Status Filesystem::ZeroPastEof(Inode* inode, uint64_t new_size) {
  uint64_t size;
  {
    std::lock_guard l(inode->mu);
    size = inode->rec.size;
    if (!TailNeedsZeroing(*inode, new_size)) return Status::Ok();
  }
  DEFERFS_RETURN_IF_ERROR(ZeroPartialBlock(inode, size, RoundUp(size), /*fua=*/true));
  std::lock_guard l(inode->mu);
  inode->zeroed_past = size;  // the iolock, held exclusive, kept the size
  return Status::Ok();
}

Status Filesystem::TruncateLocked(Inode* inode, const SetAttrRequest& req) {
  const uint64_t size = static_cast<uint64_t>(req.attr.st_size);
  const int64_t now = NowNs();
  uint64_t old;
  {
    std::lock_guard l(inode->mu);
    old = inode->rec.size;
    inode->DropRmwBlock();  // blocks past the new EOF go
  }
  // Bytes past the new EOF in its last block must read as zeros if the file
  // grows again: zero them now.
  if (size < old && !Aligned(size)) DEFERFS_RETURN_IF_ERROR(ZeroPartialBlock(inode, size, RoundUp(size)));
  DEFERFS_RETURN_IF_ERROR(ZeroPastEof(inode, size));
  std::lock_guard l(inode->mu);
  ExtentDelta delta;
  if (size <= old) {
    // Also to the same size, as ext4: blocks preallocated past EOF (KEEP_SIZE)
    // go. The block holding EOF stays.
    uint64_t first = RoundUp(size) >> kBlockShift;
    inode->extents.Punch(first, UINT64_MAX - first, &delta);
  }
  InodeRecord rec = inode->rec;
  rec.size = size;
  // Even to the same size (open O_TRUNC, ftruncate), as ext4: the kernel
  // leaves that mtime to us. An explicit one in the same SETATTR wins after.
  rec.mtime_ns = now;
  req.ApplyTo(&rec, now);
  MetaBatch b;
  ApplyDelta(inode->ino, delta, &b);
  b.PutInode(rec);
  DEFERFS_RETURN_IF_ERROR(CommitInode(inode, &b));
  inode->rec = rec;
  inode->dirty = false;
  FreeBlocksLater(delta.freed);
  return Status::Ok();
}

Status Filesystem::Fallocate(Inode* inode, int mode, uint64_t off, uint64_t len) {
  const int kind = mode & ~FALLOC_FL_KEEP_SIZE;
  if ((kind != 0 && kind != FALLOC_FL_PUNCH_HOLE && kind != FALLOC_FL_ZERO_RANGE) ||
      (kind == FALLOC_FL_PUNCH_HOLE && !(mode & FALLOC_FL_KEEP_SIZE))) {
    return Status::Error(EOPNOTSUPP, "fallocate mode not supported");
  }
  if (len == 0 || off + len < off) return Status::Invalid("bad fallocate range");
  DEFERFS_RETURN_IF_ERROR(CheckWritable());
  const uint64_t end = off + len;
  const bool keep_size = (mode & FALLOC_FL_KEEP_SIZE) || kind == FALLOC_FL_PUNCH_HOLE;
  // Whole blocks: preallocation covers partial edge blocks; punch and zero
  // leave those to ZeroPartialBlock.
  const uint64_t first = (kind == 0 ? RoundDown(off) : RoundUp(off)) >> kBlockShift;
  const uint64_t last = (kind == 0 ? RoundUp(end) : RoundDown(end)) >> kBlockShift;

  inode->iolock.Lock();
  inode_dio_wait(inode);
  Status st;
  // All or nothing (on a full device nothing is left half-done): the blocks
  // are taken before the file changes, and go straight back to the allocator
  // if the call fails, since no commit ever referenced them.
  std::vector<Extent> fresh;
  if (kind != FALLOC_FL_PUNCH_HOLE) {
    std::lock_guard l(inode->mu);
    // The ranges to allocate: the holes. Counted first: a request that cannot
    // fit fails without taking, for a moment, every free block from other
    // writers. A zero range keeps the blocks it has, as ext4 does (no space
    // needed for them, even on a full device): they turn unwritten.
    std::vector<std::pair<uint64_t, uint64_t>> holes;  // logical block, count
    uint64_t need = 0;
    for (uint64_t b = first; b < last;) {
      Extent e;
      uint64_t hole = last - b;
      if (inode->extents.Find(b, &e, &hole)) {
        b += e.len;
        continue;
      }
      const uint64_t n = std::min(hole, last - b);
      holes.push_back({b, n});
      need += n;
      b += n;
    }
    if (need > alloc_->free_blocks() && !(ReclaimFreedBlocks() && need <= alloc_->free_blocks())) {
      st = Status::NoSpace("not enough free space for the fallocate");
    }
    uint64_t goal = inode->extents.last_pblk_hint();
    for (const auto& [lblk, count] : holes) {
      for (uint64_t done = 0; st.ok() && done < count;) {  // the allocator may return less
        BlockRange r;
        st = alloc_->Allocate(goal, count - done, &r);
        if (st.err() == ENOSPC && ReclaimFreedBlocks()) st = alloc_->Allocate(goal, count - done, &r);
        if (!st.ok()) break;
        fresh.push_back(Extent{lblk + done, r.len, r.start, ExtentState::kUnwritten});  // reads as zeros
        goal = r.start + r.len;
        done += r.len;
      }
    }
  }
  if (st.ok() && !keep_size) st = ZeroPastEof(inode, end);
  // Punch and zero: partial blocks at the edges are zeroed in place.
  if (st.ok() && kind != 0) {
    uint64_t head_end = std::min(end, RoundUp(off));
    if (!Aligned(off)) st = ZeroPartialBlock(inode, off, head_end);
    if (st.ok() && !Aligned(end) && RoundDown(end) >= RoundUp(off)) st = ZeroPartialBlock(inode, RoundDown(end), end);
  }
  if (st.ok()) {
    std::lock_guard l(inode->mu);
    inode->DropRmwBlock();  // punched or zeroed blocks read as zeros now
    ExtentDelta delta;
    if (kind == FALLOC_FL_PUNCH_HOLE && last > first) inode->extents.Punch(first, last - first, &delta);
    if (kind == FALLOC_FL_ZERO_RANGE && last > first) {
      inode->extents.Convert(first, last - first, &delta, ExtentState::kUnwritten);  // nothing freed
    }
    for (const Extent& e : fresh) inode->extents.Insert(e, &delta);
    // Mapped now: if the commit fails, the filesystem shuts down and the next
    // mount rebuilds free space from what was committed.
    fresh.clear();
    InodeRecord rec = inode->rec;
    if (!keep_size && end > rec.size) rec.size = end;
    rec.ctime_ns = NowNs();
    if (kind != 0 || rec.size != inode->rec.size) rec.mtime_ns = rec.ctime_ns;
    MetaBatch b;
    ApplyDelta(inode->ino, delta, &b);
    b.PutInode(rec);
    st = CommitInode(inode, &b);
    if (st.ok()) {
      inode->rec = rec;
      inode->dirty = false;
      FreeBlocksLater(delta.freed);
    }
  }
  for (const Extent& e : fresh) alloc_->Free({e.pblk, e.len});
  inode->iolock.Unlock();
  return st;
}

Status Filesystem::Lseek(Inode* inode, uint64_t off, int whence, uint64_t* out) {
  std::lock_guard l(inode->mu);
  const uint64_t size = inode->rec.size;
  if (off >= size) return Status::Error(ENXIO, "offset past end of file");
  // Unwritten extents read as zeros: they count as holes, as on ext4.
  uint64_t b = off >> kBlockShift;
  if (whence == SEEK_DATA) {
    for (Extent e; inode->extents.NextAfter(b, &e); b = e.lblk + e.len) {
      if (e.state != ExtentState::kWritten) continue;
      uint64_t at = std::max(off, e.lblk << kBlockShift);
      if (at >= size) break;
      *out = at;
      return Status::Ok();
    }
    return Status::Error(ENXIO, "no data after offset");
  }
  uint64_t hole;
  for (Extent e; inode->extents.Find(b, &e, &hole) && e.state == ExtentState::kWritten;) b = e.lblk + e.len;
  *out = std::min(size, std::max(off, b << kBlockShift));
  return Status::Ok();
}

Status Filesystem::Fsync(Inode* inode, bool datasync) {
  // fdatasync owes the data and what it takes to read it back, not the
  // timestamps of pure overwrites (all that `dirty` ever holds). Once every
  // commit of this inode is durable, that is one device flush, as ext4's
  // fdatasync when only timestamps changed; the WAL stays as it is.
  bool data_only;
  {
    std::lock_guard l(inode->mu);
    data_only = datasync && inode->meta_epoch <= synced_epoch_.load(std::memory_order_acquire);
    if (!data_only && inode->dirty && !inode->deleted) {
      MetaBatch b;
      b.PutInode(inode->rec);
      DEFERFS_RETURN_IF_ERROR(CommitInode(inode, &b));
      inode->dirty = false;
    }
  }
  return data_only ? FlushData() : Sync();
}

}  // namespace deferfs
