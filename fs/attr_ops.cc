// Attribute operations: getattr, setattr, statfs, xattrs, sync; and the
// Filesystem's construction and mount-time recovery.
#include <sys/xattr.h>

#include "fs/filesystem.h"

namespace deferfs {
namespace {

timespec ToTimespec(int64_t ns) { return {static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)}; }
int64_t FromTimespec(const timespec& ts) { return ts.tv_sec * 1'000'000'000LL + ts.tv_nsec; }

}  // namespace

Filesystem::Filesystem(std::unique_ptr<Device> dev, std::unique_ptr<MetaStore> meta, const Superblock& sb)
    : dev_(std::move(dev)), meta_(std::move(meta)), sb_(sb), inodes_(meta_.get()), next_ino_(meta_->next_ino()) {}

Filesystem::~Filesystem() = default;

Status Filesystem::Recover() {
  std::lock_guard ns(ns_mu_);
  std::vector<uint64_t> orphans;
  DEFERFS_RETURN_IF_ERROR(meta_->ListOrphans(&orphans));
  if (orphans.empty()) return Status::Ok();
  MetaBatch b;
  for (uint64_t ino : orphans) b.DeleteInode(ino);
  return meta_->Commit(&b, /*sync=*/true);
}

void Filesystem::FillStat(const Inode& inode, struct stat* st) const {
  const InodeRecord& r = inode.rec;
  *st = {};
  st->st_ino = r.ino;
  st->st_mode = r.mode;
  st->st_nlink = r.nlink;
  st->st_uid = r.uid;
  st->st_gid = r.gid;
  st->st_rdev = r.rdev;
  st->st_size = static_cast<off_t>(r.size);
  st->st_blksize = kBlockSize;
  st->st_atim = ToTimespec(r.atime_ns);
  st->st_mtim = ToTimespec(r.mtime_ns);
  st->st_ctim = ToTimespec(r.ctime_ns);
}

Status Filesystem::GetAttr(uint64_t ino, struct stat* out) {
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  std::lock_guard l(inode->mu);
  FillStat(*inode, out);
  return Status::Ok();
}

Status Filesystem::SetAttr(uint64_t ino, const SetAttrRequest& req, struct stat* out) {
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  std::lock_guard l(inode->mu);
  InodeRecord rec = inode->rec;
  int64_t now = NowNs();
  const struct stat& a = req.attr;
  if (req.valid & SetAttrRequest::kMode) rec.mode = (rec.mode & S_IFMT) | (a.st_mode & 07777);
  if (req.valid & SetAttrRequest::kUid) rec.uid = a.st_uid;
  if (req.valid & SetAttrRequest::kGid) rec.gid = a.st_gid;
  if (req.valid & SetAttrRequest::kSize) {
    if (!inode->is_reg()) return Status::Error(inode->is_dir() ? EISDIR : EINVAL, "not a regular file");
    if (rec.size != static_cast<uint64_t>(a.st_size)) rec.mtime_ns = now;
    rec.size = static_cast<uint64_t>(a.st_size);
  }
  if (req.valid & SetAttrRequest::kAtimeNow) rec.atime_ns = now;
  else if (req.valid & SetAttrRequest::kAtime) rec.atime_ns = FromTimespec(a.st_atim);
  if (req.valid & SetAttrRequest::kMtimeNow) rec.mtime_ns = now;
  else if (req.valid & SetAttrRequest::kMtime) rec.mtime_ns = FromTimespec(a.st_mtim);
  rec.ctime_ns = (req.valid & SetAttrRequest::kCtime) ? FromTimespec(a.st_ctim) : now;

  MetaBatch b;
  b.PutInode(rec);
  DEFERFS_RETURN_IF_ERROR(Commit(&b));
  inode->rec = rec;
  FillStat(*inode, out);
  return Status::Ok();
}

Status Filesystem::StatFs(struct statvfs* out) {
  *out = {};
  out->f_bsize = kBlockSize;
  out->f_frsize = kBlockSize;
  out->f_blocks = sb_.block_count() - sb_.first_data_block;
  out->f_bfree = out->f_blocks;
  out->f_bavail = out->f_blocks;
  // Inodes are keys in RocksDB: there is no fixed table, so report plenty.
  out->f_files = 1ull << 32;
  {
    std::lock_guard ns(ns_mu_);
    out->f_ffree = out->f_files - std::min<uint64_t>(out->f_files, next_ino_);
  }
  out->f_favail = out->f_ffree;
  out->f_namemax = 255;
  return Status::Ok();
}

Status Filesystem::SetXattr(uint64_t ino, std::string_view name, std::string_view value, int flags) {
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  std::string old;
  Status st = meta_->GetXattr(ino, name, &old);
  if (!st.ok() && st.err() != ENODATA) return st;
  if ((flags & XATTR_CREATE) && st.ok()) return Status::Error(EEXIST, "attribute exists");
  if ((flags & XATTR_REPLACE) && !st.ok()) return Status::Error(ENODATA, "no such attribute");
  std::lock_guard l(inode->mu);
  InodeRecord rec = inode->rec;
  rec.ctime_ns = NowNs();
  MetaBatch b;
  b.PutXattr(ino, name, value);
  b.PutInode(rec);
  DEFERFS_RETURN_IF_ERROR(Commit(&b));
  inode->rec = rec;
  return Status::Ok();
}

Status Filesystem::GetXattr(uint64_t ino, std::string_view name, std::string* value) {
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  return meta_->GetXattr(ino, name, value);
}

Status Filesystem::ListXattr(uint64_t ino, std::string* names) {
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  std::vector<std::string> v;
  DEFERFS_RETURN_IF_ERROR(meta_->ListXattrs(ino, &v));
  names->clear();
  for (const auto& n : v) {
    names->append(n);
    names->push_back('\0');
  }
  return Status::Ok();
}

Status Filesystem::RemoveXattr(uint64_t ino, std::string_view name) {
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  std::string old;
  DEFERFS_RETURN_IF_ERROR(meta_->GetXattr(ino, name, &old));
  std::lock_guard l(inode->mu);
  InodeRecord rec = inode->rec;
  rec.ctime_ns = NowNs();
  MetaBatch b;
  b.DeleteXattr(ino, name);
  b.PutInode(rec);
  DEFERFS_RETURN_IF_ERROR(Commit(&b));
  inode->rec = rec;
  return Status::Ok();
}

Status Filesystem::Sync() {
  // Data first, then the metadata that makes it reachable (see DESIGN.md).
  DEFERFS_RETURN_IF_ERROR(dev_->FlushSync());
  return meta_->SyncWal();
}

}  // namespace deferfs
