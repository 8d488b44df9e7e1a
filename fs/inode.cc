#include "fs/inode.h"

namespace deferfs {

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
  if (!slot) slot = std::make_unique<Inode>(rec);
  return slot.get();
}

void InodeTable::MaybeEvict(Inode* inode) {
  // The root is never forgotten by the kernel; keep it regardless.
  if (inode->nlookup == 0 && inode->open_count == 0 && inode->ino != kRootIno) {
    map_.erase(inode->ino);
  }
}

}  // namespace deferfs
