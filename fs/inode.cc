#include "fs/inode.h"

namespace deferfs {

void IoLock::LockShared() {
  auto try_lock = [this] {
    std::lock_guard l(mu_);
    if (writer_ || writers_waiting_ > 0) return false;
    readers_++;
    return true;
  };
  if (!try_lock()) TaskWork::Current()->WaitUntil(try_lock, &wq_);
}

void IoLock::UnlockShared() {
  bool last;
  {
    std::lock_guard l(mu_);
    last = --readers_ == 0;
  }
  if (last) wq_.WakeAll();
}

void IoLock::Lock() {
  {
    std::lock_guard l(mu_);
    if (!writer_ && readers_ == 0) {
      writer_ = true;
      return;
    }
    writers_waiting_++;
  }
  TaskWork::Current()->WaitUntil(
      [this] {
        std::lock_guard l(mu_);
        if (writer_ || readers_ > 0) return false;
        writer_ = true;
        writers_waiting_--;
        return true;
      },
      &wq_);
}

void IoLock::Unlock() {
  {
    std::lock_guard l(mu_);
    writer_ = false;
  }
  wq_.WakeAll();
}

void inode_dio_begin(Inode* inode) { inode->dio_count.fetch_add(1, std::memory_order_relaxed); }

void inode_dio_end(Inode* inode) {
  if (inode->dio_count.fetch_sub(1, std::memory_order_seq_cst) == 1) inode->dio_wq.WakeAll();
}

void inode_dio_wait(Inode* inode) {
  if (inode->dio_count.load(std::memory_order_seq_cst) == 0) return;
  TaskWork::Current()->WaitUntil([inode] { return inode->dio_count.load(std::memory_order_seq_cst) == 0; },
                                 &inode->dio_wq);
}

Status InodeTable::Get(uint64_t ino, Inode** out) {
  if (auto it = map_.find(ino); it != map_.end()) {
    *out = it->second.get();
    return Status::Ok();
  }
  InodeRecord rec;
  DEFERFS_RETURN_IF_ERROR(meta_->GetInode(ino, &rec));
  *out = Insert(rec);
  return Status::Ok();
}

Inode* InodeTable::Insert(const InodeRecord& rec) {
  auto& slot = map_[rec.ino];
  if (!slot) {
    slot = std::make_unique<Inode>(rec);
    slot->meta_epoch = EpochAfterCommit(*wal_epoch_);  // no other thread can reach it yet
  }
  return slot.get();
}

void InodeTable::MaybeEvict(Inode* inode) {
  // The root is never forgotten by the kernel; keep it regardless.
  if (inode->nlookup == 0 && inode->open_count == 0 && inode->ino != kRootIno) {
    map_.erase(inode->ino);
  }
}

}  // namespace deferfs
