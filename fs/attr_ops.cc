// Attribute operations: getattr, setattr, statfs, xattrs, sync; and the
// Filesystem's construction and mount-time recovery.
#include <sys/xattr.h>

#include <cstdint>

#include "backend/log.h"
#include "fs/filesystem.h"

namespace deferfs {
namespace {

constexpr int64_t kNsPerSec = 1'000'000'000;

// Times are nanoseconds since 1970 in 64 bits (1677 to 2262). Before 1970
// the second rounds down, so that tv_nsec stays in [0, 1e9).
timespec ToTimespec(int64_t ns) {
  int64_t sec = ns / kNsPerSec, nsec = ns % kNsPerSec;
  if (nsec < 0) {
    sec--;
    nsec += kNsPerSec;
  }
  return {static_cast<time_t>(sec), static_cast<long>(nsec)};
}

// Times outside the range are clamped to its ends, as the kernel clamps the
// times a filesystem cannot store (ext4's before 1901, after 2446).
int64_t FromTimespec(const timespec& ts) {
  int64_t ns;
  if (__builtin_mul_overflow(static_cast<int64_t>(ts.tv_sec), kNsPerSec, &ns) ||
      __builtin_add_overflow(ns, static_cast<int64_t>(ts.tv_nsec), &ns)) {
    return ts.tv_sec < 0 ? INT64_MIN : INT64_MAX;
  }
  return ns;
}

// The namespaces ext4 stores, less POSIX ACLs: deferfs does not enforce
// them, and refusing them is what makes cp -p and mv fall back to chmod (a
// stored ACL would replace the mode they copy, and mean nothing).
Status CheckXattrName(std::string_view name) {
  for (std::string_view ns : {"user.", "trusted.", "security."}) {
    if (!name.starts_with(ns)) continue;
    if (name.size() == ns.size()) return Status::Error(EINVAL, "empty attribute name");
    return Status::Ok();
  }
  return Status::Error(EOPNOTSUPP, "unsupported attribute namespace (user., trusted. and security. are)");
}

// What a full listing of an inode's xattrs says about it.
Inode::Xattrs XattrsOf(const std::vector<std::string>& names) {
  return names.empty() ? Inode::Xattrs::kNone : Inode::Xattrs::kSome;
}

}  // namespace

Filesystem::Filesystem(std::unique_ptr<Device> dev, std::unique_ptr<MetaStore> meta, const Superblock& sb,
                       const FsOptions& opt)
    : dev_(std::move(dev)), meta_(std::move(meta)), sb_(sb), opt_(opt), inodes_(meta_.get(), &wal_epoch_),
      next_ino_(meta_->next_ino()) {
  // data=ordered: the store writes nothing to its own filesystem until the
  // data its commits reference is flushed (backend/data_barrier.h).
  meta_->barrier().SetFlush([dev = dev_.get()] { return dev->FlushSync(); });
}

Status Filesystem::Mount(std::unique_ptr<Device> dev, std::unique_ptr<MetaStore> meta, const Superblock& sb,
                         const FsOptions& opt, std::unique_ptr<Filesystem>* out) {
  FsOptions o = opt;
  o.dirsync = o.dirsync || o.sync;
  auto fs = std::make_unique<Filesystem>(std::move(dev), std::move(meta), sb, o);
  DEFERFS_RETURN_IF_ERROR(fs->Recover());
  DEFERFS_RETURN_IF_ERROR(fs->Start());
  *out = std::move(fs);
  return Status::Ok();
}

Status Filesystem::Start() {
  // Free space is not persisted: it is the complement of all extents. In-flight
  // allocations of a crashed mount were never committed, so they come back here.
  alloc_ = std::make_unique<Allocator>(sb_.first_data_block, sb_.block_count());
  Status bad;
  DEFERFS_RETURN_IF_ERROR(meta_->ForEachExtentAll([&](uint64_t ino, const ExtentRecord& e) {
    if (!bad.ok()) return;
    Status st = alloc_->MarkUsed({e.pblk, e.len});
    if (!st.ok()) {
      bad = Status::IoError("metadata is inconsistent (inode " + std::to_string(ino) + ": " + st.message() +
                            "): run 'deferfs fsck'");
    }
  }));
  DEFERFS_RETURN_IF_ERROR(bad);
  {
    std::lock_guard ns(ns_mu_);
    DEFERFS_RETURN_IF_ERROR(meta_->CountInodes(&live_inodes_));
  }

  buffers_ = std::make_unique<IoBufferPool>(opt_.io_buffers, kIoBufferBytes);
  if (!buffers_->ok()) return Status::Error(ENOMEM, "cannot allocate the IO buffers");
  PollerOptions popt;
  popt.ring_depth = opt_.ring_depth;
  popt.buffers = buffers_->iovecs();
  popt.fault_inject = opt_.fault_inject;
  std::vector<Poller*> raw;
  for (unsigned i = 0; i < opt_.pollers; i++) {
    std::unique_ptr<Poller> p;
    DEFERFS_RETURN_IF_ERROR(Poller::Create(*dev_, popt, &p));
    raw.push_back(p.get());
    pollers_.push_back(std::move(p));
  }
  workqueue_ = std::make_unique<Workqueue>(opt_.cthreads);
  iomap_ = std::make_unique<IomapOps>(alloc_.get(), [this] { return ReclaimFreedBlocks(); }, &synced_epoch_);
  engine_ = std::make_unique<DioEngine>(opt_.completion, std::move(raw), workqueue_.get(), iomap_.get(),
                                        [this](std::span<Dio* const> dios) { return WriteEndIo(dios); });
  journal_ = std::make_unique<JournalCommit>(std::chrono::seconds(opt_.commit_interval_s), [this] {
    if (shut_down()) return;  // already reported; nothing more may be written
    Status st = SyncMeta();
    if (!st.ok()) LogError("background metadata commit failed: %s", st.message().c_str());
  });
  return Status::Ok();
}

Filesystem::~Filesystem() {
  // Every request has been answered by now; let the threads finish, then
  // persist what was only in memory (timestamps of pure overwrites). The
  // kernel lets go of every inode at unmount without telling us (its
  // forgets die with the connection): unlinked ones are deleted here, not
  // left as orphans for the next mount.
  journal_.reset();
  pollers_.clear();
  workqueue_.reset();
  std::lock_guard ns(ns_mu_);
  if (opt_.read_only) return;
  MetaBatch b;
  std::vector<BlockRange> freed;  // the next mount rebuilds free space from the extents
  inodes_.ForEach([&](Inode* inode) {
    std::lock_guard l(inode->mu);
    if (inode->deleted) return;
    if (inode->rec.nlink == 0 && inode->ino != kRootIno) Destroy(inode, &b, &freed);
    else if (inode->dirty) b.PutInode(inode->rec);
  });
  if (!b.empty() && !shut_down()) (void)meta_->Commit(&b);
  (void)Sync();  // unmount is a durability point, pure overwrites included
}

Status Filesystem::Recover() {
  // Orphans were unlinked while in use (open, or known to the kernel) when
  // the last mount ended without letting go of them: nothing references
  // them now, so delete them (their blocks come back when Start() rebuilds
  // the free space).
  if (opt_.read_only) return Status::Ok();  // the next read-write mount frees them
  std::lock_guard ns(ns_mu_);
  std::vector<uint64_t> orphans;
  DEFERFS_RETURN_IF_ERROR(meta_->ListOrphans(&orphans));
  if (orphans.empty()) return Status::Ok();
  MetaBatch b;
  for (uint64_t ino : orphans) meta_->DeleteInode(ino, &b);
  return meta_->Commit(&b, /*sync=*/true);
}

void Filesystem::FillStat(Inode& inode, struct stat* st) {
  (void)EnsureExtents(&inode);  // st_blocks; an unreadable map shows as 0 here and fails at open
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
  st->st_blocks = static_cast<blkcnt_t>(inode.extents.mapped_blocks() * (kBlockSize / 512));
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
  DEFERFS_RETURN_IF_ERROR(CheckWritable());
  Inode* inode;
  {
    // The kernel holds the inode for the whole request: it stays cached
    // after ns_mu_ is dropped, and a truncate may now wait for IO.
    std::lock_guard ns(ns_mu_);
    DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  }
  if (req.valid & SetAttrRequest::kSize) {
    {
      std::lock_guard l(inode->mu);
      if (!inode->is_reg()) return Status::Error(inode->is_dir() ? EISDIR : EINVAL, "not a regular file");
      DEFERFS_RETURN_IF_ERROR(EnsureExtents(inode));
    }
    inode->iolock.Lock();
    inode_dio_wait(inode);
    Status st = TruncateLocked(inode, req);
    inode->iolock.Unlock();
    DEFERFS_RETURN_IF_ERROR(st);
    std::lock_guard l(inode->mu);
    FillStat(*inode, out);
    return Status::Ok();
  }

  std::lock_guard l(inode->mu);
  InodeRecord rec = inode->rec;
  req.ApplyTo(&rec, NowNs());
  MetaBatch b;
  b.PutInode(rec);
  DEFERFS_RETURN_IF_ERROR(CommitInode(inode, &b));
  inode->rec = rec;
  inode->dirty = false;
  FillStat(*inode, out);
  return Status::Ok();
}

void SetAttrRequest::ApplyTo(InodeRecord* rec, int64_t now) const {
  const struct stat& a = attr;
  if (valid & kMode) rec->mode = (rec->mode & S_IFMT) | (a.st_mode & 07777);
  if (valid & kUid) rec->uid = a.st_uid;
  if (valid & kGid) rec->gid = a.st_gid;
  if (valid & kAtimeNow) rec->atime_ns = now;
  else if (valid & kAtime) rec->atime_ns = FromTimespec(a.st_atim);
  if (valid & kMtimeNow) rec->mtime_ns = now;
  else if (valid & kMtime) rec->mtime_ns = FromTimespec(a.st_mtim);
  rec->ctime_ns = (valid & kCtime) ? FromTimespec(a.st_ctim) : now;
}

Status Filesystem::StatFs(struct statvfs* out) {
  *out = {};
  out->f_bsize = kBlockSize;
  out->f_frsize = kBlockSize;
  out->f_blocks = sb_.block_count() - sb_.first_data_block;
  {
    std::lock_guard l(free_mu_);
    out->f_bfree = alloc_->free_blocks();
    for (const BlockRange& r : pending_free_) out->f_bfree += r.len;
  }
  out->f_bavail = out->f_bfree;
  // Inodes are keys in RocksDB: there is no fixed table, so report plenty.
  out->f_files = 1ull << 32;
  {
    std::lock_guard ns(ns_mu_);
    out->f_ffree = out->f_files - std::min<uint64_t>(out->f_files, live_inodes_);
  }
  out->f_favail = out->f_ffree;
  out->f_namemax = 255;
  return Status::Ok();
}

Status Filesystem::SetXattr(uint64_t ino, std::string_view name, std::string_view value, int flags) {
  return SyncedIf(opt_.sync, PutXattr(ino, name, value, flags));
}

Status Filesystem::PutXattr(uint64_t ino, std::string_view name, std::string_view value, int flags) {
  DEFERFS_RETURN_IF_ERROR(CheckWritable());
  DEFERFS_RETURN_IF_ERROR(CheckXattrName(name));
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  std::string old;
  Status st = LookupXattr(inode, name, &old);
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
  inode->xattrs = Inode::Xattrs::kSome;
  return Status::Ok();
}

Status Filesystem::LookupXattr(Inode* inode, std::string_view name, std::string* value) {
  if (inode->xattrs == Inode::Xattrs::kUnknown) {
    std::vector<std::string> names;
    DEFERFS_RETURN_IF_ERROR(meta_->ListXattrs(inode->ino, &names));
    inode->xattrs = XattrsOf(names);
  }
  if (inode->xattrs == Inode::Xattrs::kNone) return Status::Error(ENODATA, "no such attribute");
  return meta_->GetXattr(inode->ino, name, value);
}

Status Filesystem::GetXattr(uint64_t ino, std::string_view name, std::string* value) {
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  // ACLs stored by an older deferfs stay hidden (removexattr still clears them).
  DEFERFS_RETURN_IF_ERROR(CheckXattrName(name));
  return LookupXattr(inode, name, value);
}

Status Filesystem::ListXattr(uint64_t ino, std::string* names) {
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  std::vector<std::string> v;
  DEFERFS_RETURN_IF_ERROR(meta_->ListXattrs(ino, &v));
  inode->xattrs = XattrsOf(v);
  names->clear();
  for (const auto& n : v) {
    if (!CheckXattrName(n).ok()) continue;
    names->append(n);
    names->push_back('\0');
  }
  return Status::Ok();
}

Status Filesystem::RemoveXattr(uint64_t ino, std::string_view name) {
  return SyncedIf(opt_.sync, DeleteXattr(ino, name));
}

Status Filesystem::DeleteXattr(uint64_t ino, std::string_view name) {
  DEFERFS_RETURN_IF_ERROR(CheckWritable());
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  std::string old;
  DEFERFS_RETURN_IF_ERROR(LookupXattr(inode, name, &old));
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

Status Filesystem::FlushData() {
  DEFERFS_RETURN_IF_ERROR(CheckLive());
  if (opt_.read_only) return Status::Ok();  // this mount wrote nothing to make durable
  return meta_->barrier().Flush();
}

Status Filesystem::Sync() {
  // Data first, then the metadata that makes it reachable (see DESIGN.md);
  // after that, blocks freed before the sync are safe to reuse.
  DEFERFS_RETURN_IF_ERROR(FlushData());
  return opt_.read_only ? Status::Ok() : SyncMeta();
}

}  // namespace deferfs
