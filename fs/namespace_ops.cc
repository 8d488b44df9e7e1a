// Namespace operations: lookup, create, link, unlink, rename, readdir.
// Each runs under ns_mu_ and commits all its keys in one MetaBatch; in-memory
// state changes only after the commit succeeded, so a failed commit leaves
// both the store and the cache as they were.
#include <fcntl.h>
#include <linux/fs.h>

#include <algorithm>
#include <ctime>

#include "backend/log.h"
#include "fs/filesystem.h"

namespace deferfs {
namespace {

constexpr size_t kNameMax = 255;
constexpr size_t kSymlinkMax = 4095;

// Locks the distinct inodes among the arguments, in a fixed order. Only
// namespace operations hold more than one Inode::mu, and they do it under
// ns_mu_, so the order cannot deadlock against the data path.
class InodeLocks {
 public:
  explicit InodeLocks(std::initializer_list<Inode*> inodes) {
    std::vector<Inode*> order;
    for (Inode* i : inodes) {
      if (i != nullptr && std::find(order.begin(), order.end(), i) == order.end()) order.push_back(i);
    }
    std::sort(order.begin(), order.end(), [](Inode* a, Inode* b) { return a->ino < b->ino; });
    for (Inode* i : order) locks_.emplace_back(i->mu);
  }

 private:
  std::vector<std::unique_lock<std::mutex>> locks_;
};

}  // namespace

Status Filesystem::CheckName(std::string_view name) const {
  if (name.size() > kNameMax) return Status::Error(ENAMETOOLONG, "name too long");
  return Status::Ok();
}

Status Filesystem::GetLocked(uint64_t ino, Inode** out) {
  // An inode is deleted only once the kernel forgot it (and leaves the table
  // then), so it cannot ask: a safety check.
  Status st = inodes_.Get(ino, out);
  if (st.err() == ENOENT || (st.ok() && (*out)->deleted)) return Status::Error(ESTALE, "stale inode");
  return st;
}

Status Filesystem::CheckLive() const {
  if (!shut_down()) return Status::Ok();
  return Status::IoError("the filesystem was shut down after a metadata store failure");
}

Status Filesystem::CheckWritable() const {
  if (opt_.read_only) return Status::Error(EROFS, "the filesystem is mounted read-only");
  return CheckLive();
}

Status Filesystem::MetaFailed(const Status& st) {
  // The first failure wins the log line; whatever raced it is EIO as well.
  if (!shutdown_.exchange(true, std::memory_order_acq_rel)) {
    LogError("metadata store failed (%s): shutting down, every change now fails with EIO; "
             "unmount, fix the metadata directory and mount again",
             st.message().c_str());
  }
  return Status::IoError("metadata store failed: " + st.message());
}

Status Filesystem::Commit(MetaBatch* b, bool sync, bool may_defer) {
  DEFERFS_RETURN_IF_ERROR(CheckWritable());  // a store opened read-only would refuse it as a failure
  Status st = may_defer && !sync ? meta_->CommitDeferred(b) : meta_->Commit(b, sync);
  return st.ok() ? st : MetaFailed(st);
}

Status Filesystem::Lookup(uint64_t parent, std::string_view name, struct stat* out) {
  DEFERFS_RETURN_IF_ERROR(CheckName(name));
  std::lock_guard ns(ns_mu_);
  DirEntry e;
  DEFERFS_RETURN_IF_ERROR(meta_->Lookup(parent, name, &e));
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(inodes_.Get(e.ino, &inode));
  inode->nlookup++;
  std::lock_guard l(inode->mu);
  FillStat(*inode, out);
  return Status::Ok();
}

void Filesystem::Forget(std::span<const Forgotten> forgets) {
  std::lock_guard ns(ns_mu_);
  const bool may_delete = !shut_down() && !opt_.read_only;  // else orphans wait for the next mount
  MetaBatch b;
  std::vector<BlockRange> freed;
  std::vector<Inode*> gone;
  for (const Forgotten& f : forgets) {
    Inode* inode = inodes_.Find(f.ino);  // one the kernel knows is in the table
    if (inode == nullptr) continue;
    inode->nlookup -= std::min(inode->nlookup, f.nlookup);
    if (inode->nlookup > 0) continue;
    const bool was_deleted = inode->deleted;  // the same inode twice in one batch
    if (may_delete) {
      std::lock_guard l(inode->mu);
      MaybeDestroy(inode, &b, &freed);
    }
    if (inode->deleted) {
      if (!was_deleted) gone.push_back(inode);
    } else {
      inodes_.MaybeEvict(inode);
    }
  }
  if (b.empty()) return;
  if (Status st = Commit(&b); st.ok()) {
    FreeBlocksLater(freed);
    live_inodes_ -= gone.size();
  } else {
    LogError("cannot delete %zu unlinked inodes (they stay orphans; the next mount frees them): %s",
             gone.size(), st.message().c_str());
  }
  for (Inode* inode : gone) inodes_.MaybeEvict(inode);
}

Status Filesystem::SyncedIf(bool durable, Status st) {
  if (!st.ok() || !durable) return st;
  return SyncMeta();
}

Status Filesystem::CreateNode(const Caller& c, uint64_t parent_ino, std::string_view name, uint32_t mode,
                              uint64_t rdev, std::string_view target, struct stat* out) {
  return SyncedIf(opt_.dirsync, AddNode(c, parent_ino, name, mode, rdev, target, out));
}

Status Filesystem::AddNode(const Caller& c, uint64_t parent_ino, std::string_view name, uint32_t mode,
                           uint64_t rdev, std::string_view target, struct stat* out) {
  DEFERFS_RETURN_IF_ERROR(CheckWritable());
  DEFERFS_RETURN_IF_ERROR(CheckName(name));
  if (S_ISLNK(mode) && target.size() > kSymlinkMax) return Status::Error(ENAMETOOLONG, "symlink target too long");
  std::lock_guard ns(ns_mu_);
  Inode* parent;
  DEFERFS_RETURN_IF_ERROR(GetLocked(parent_ino, &parent));
  InodeLocks locks{parent};
  if (!parent->is_dir()) return Status::Error(ENOTDIR, "not a directory");
  if (parent->rec.nlink == 0) return Status::Error(ENOENT, "directory was removed");
  DirEntry existing;
  Status st = meta_->Lookup(parent_ino, name, &existing);
  if (st.ok()) return Status::Error(EEXIST, "exists");
  if (st.err() != ENOENT) return st;

  int64_t now = NowNs();
  InodeRecord rec;
  rec.ino = next_ino_;
  rec.mode = mode;
  rec.uid = c.uid;
  rec.gid = c.gid;
  rec.nlink = S_ISDIR(mode) ? 2 : 1;
  rec.rdev = rdev;
  rec.size = S_ISLNK(mode) ? target.size() : 0;
  rec.atime_ns = rec.mtime_ns = rec.ctime_ns = rec.crtime_ns = now;
  // BSD group semantics in a setgid directory, as ext4's inode_init_owner.
  if (parent->rec.mode & S_ISGID) {
    rec.gid = parent->rec.gid;
    if (S_ISDIR(mode)) {
      rec.mode |= S_ISGID;
    } else if ((mode & (S_ISGID | S_IXGRP)) == (S_ISGID | S_IXGRP) && c.uid != 0 &&
               !(c.in_group && c.in_group(rec.gid))) {
      rec.mode &= ~S_ISGID;
    }
  }
  if (S_ISDIR(mode)) {
    rec.parent = parent_ino;
    rec.next_cookie = kFirstDirCookie;
  }

  DirEntry e{std::string(name), rec.ino, mode & S_IFMT, parent->rec.next_cookie};
  InodeRecord prec = parent->rec;
  prec.next_cookie++;
  prec.mtime_ns = prec.ctime_ns = now;
  if (S_ISDIR(mode)) prec.nlink++;

  MetaBatch b;
  b.PutInode(rec);
  b.PutDirEntry(parent_ino, e);
  b.PutInode(prec);
  b.PutNextIno(next_ino_ + 1);
  if (S_ISLNK(mode)) b.PutSymlink(rec.ino, target);
  DEFERFS_RETURN_IF_ERROR(Commit(&b));

  next_ino_++;
  live_inodes_++;
  parent->rec = prec;
  Inode* inode = inodes_.Insert(rec);
  inode->xattrs = Inode::Xattrs::kNone;  // inode numbers are never reused
  inode->nlookup++;
  FillStat(*inode, out);
  return Status::Ok();
}

Status Filesystem::Mknod(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode, uint64_t rdev,
                         struct stat* out) {
  if (!S_ISREG(mode) && !S_ISFIFO(mode) && !S_ISCHR(mode) && !S_ISBLK(mode) && !S_ISSOCK(mode)) {
    return Status::Invalid("bad file type");
  }
  return CreateNode(c, parent, name, mode, rdev, {}, out);
}

Status Filesystem::Mkdir(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode, struct stat* out) {
  return CreateNode(c, parent, name, S_IFDIR | (mode & 07777), 0, {}, out);
}

Status Filesystem::Symlink(const Caller& c, uint64_t parent, std::string_view name, std::string_view target,
                           struct stat* out) {
  return CreateNode(c, parent, name, S_IFLNK | 0777, 0, target, out);
}

Status Filesystem::Create(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode, struct stat* out,
                          Inode** handle) {
  DEFERFS_RETURN_IF_ERROR(CreateNode(c, parent, name, S_IFREG | (mode & 07777), 0, {}, out));
  return Open(out->st_ino, handle);
}

Status Filesystem::Link(uint64_t ino, uint64_t parent_ino, std::string_view name, struct stat* out) {
  return SyncedIf(opt_.dirsync, AddLink(ino, parent_ino, name, out));
}

Status Filesystem::AddLink(uint64_t ino, uint64_t parent_ino, std::string_view name, struct stat* out) {
  DEFERFS_RETURN_IF_ERROR(CheckWritable());
  DEFERFS_RETURN_IF_ERROR(CheckName(name));
  std::lock_guard ns(ns_mu_);
  Inode *inode, *parent;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  DEFERFS_RETURN_IF_ERROR(GetLocked(parent_ino, &parent));
  InodeLocks locks{inode, parent};
  if (inode->is_dir()) return Status::Error(EPERM, "hard link to a directory");
  if (inode->rec.nlink == 0) return Status::Error(ENOENT, "file was removed");
  if (inode->rec.nlink >= 65000) return Status::Error(EMLINK, "too many links");
  DirEntry existing;
  Status st = meta_->Lookup(parent_ino, name, &existing);
  if (st.ok()) return Status::Error(EEXIST, "exists");
  if (st.err() != ENOENT) return st;

  int64_t now = NowNs();
  DirEntry e{std::string(name), ino, inode->rec.mode & S_IFMT, parent->rec.next_cookie};
  InodeRecord prec = parent->rec, rec = inode->rec;
  prec.next_cookie++;
  prec.mtime_ns = prec.ctime_ns = now;
  rec.nlink++;
  rec.ctime_ns = now;
  MetaBatch b;
  b.PutDirEntry(parent_ino, e);
  b.PutInode(prec);
  b.PutInode(rec);
  DEFERFS_RETURN_IF_ERROR(Commit(&b));
  parent->rec = prec;
  inode->rec = rec;
  inode->nlookup++;
  FillStat(*inode, out);
  return Status::Ok();
}

// Caller holds ns_mu_ and the mu of dir and victim. Updates only the records
// (in place is fine: the caller commits or the whole op fails before use).
void Filesystem::DropLink(Inode* dir, const DirEntry& e, Inode* victim, int64_t now, MetaBatch* b,
                          std::vector<BlockRange>* freed) {
  b->DeleteDirEntry(dir->ino, e);
  dir->rec.mtime_ns = dir->rec.ctime_ns = now;
  victim->rec.ctime_ns = now;
  if (victim->is_dir()) {
    dir->rec.nlink--;
    victim->rec.nlink = 0;
  } else {
    victim->rec.nlink--;
  }
  b->PutInode(dir->rec);
  if (victim->rec.nlink > 0) {
    b->PutInode(victim->rec);
  } else if (victim->open_count > 0 || victim->nlookup > 0) {
    b->PutInode(victim->rec);
    b->PutOrphan(victim->ino);  // freed when let go (MaybeDestroy), or by Recover() after a crash
  } else {
    MaybeDestroy(victim, b, freed);
  }
}

void Filesystem::MaybeDestroy(Inode* inode, MetaBatch* b, std::vector<BlockRange>* freed) {
  if (inode->rec.nlink > 0 || inode->open_count > 0 || inode->nlookup > 0 || inode->deleted) return;
  Destroy(inode, b, freed);
}

void Filesystem::Destroy(Inode* inode, MetaBatch* b, std::vector<BlockRange>* freed) {
  meta_->DeleteInode(inode->ino, b);
  inode->deleted = true;
  if (!inode->is_reg()) return;
  if (inode->extents_loaded) {
    inode->extents.ForEach([&](const Extent& e) { freed->push_back({e.pblk, e.len}); });
  } else {
    meta_->ForEachExtent(inode->ino, [&](const ExtentRecord& e) { freed->push_back({e.pblk, e.len}); });
  }
}

Status Filesystem::Unlink(uint64_t parent, std::string_view name) {
  return SyncedIf(opt_.dirsync, RemoveEntry(parent, name, false));
}
Status Filesystem::Rmdir(uint64_t parent, std::string_view name) {
  return SyncedIf(opt_.dirsync, RemoveEntry(parent, name, true));
}

Status Filesystem::RemoveEntry(uint64_t parent_ino, std::string_view name, bool rmdir) {
  DEFERFS_RETURN_IF_ERROR(CheckWritable());
  DEFERFS_RETURN_IF_ERROR(CheckName(name));
  std::lock_guard ns(ns_mu_);
  DirEntry e;
  DEFERFS_RETURN_IF_ERROR(meta_->Lookup(parent_ino, name, &e));
  Inode *parent, *victim;
  DEFERFS_RETURN_IF_ERROR(GetLocked(parent_ino, &parent));
  DEFERFS_RETURN_IF_ERROR(GetLocked(e.ino, &victim));
  InodeLocks locks{parent, victim};
  if (!rmdir && victim->is_dir()) return Status::Error(EISDIR, "is a directory");
  if (rmdir) {
    if (!victim->is_dir()) return Status::Error(ENOTDIR, "not a directory");
    bool any;
    DEFERFS_RETURN_IF_ERROR(meta_->HasEntries(victim->ino, &any));
    if (any) return Status::Error(ENOTEMPTY, "directory not empty");
  }
  InodeRecord psave = parent->rec, vsave = victim->rec;
  MetaBatch b;
  std::vector<BlockRange> freed;
  DropLink(parent, e, victim, NowNs(), &b, &freed);
  Status st = Commit(&b);
  if (!st.ok()) {
    parent->rec = psave;
    victim->rec = vsave;
    victim->deleted = false;
    return st;
  }
  FreeBlocksLater(freed);
  if (victim->deleted) live_inodes_--;
  inodes_.MaybeEvict(victim);
  return Status::Ok();
}

Status Filesystem::Rename(uint64_t sp_ino, std::string_view sname, uint64_t dp_ino, std::string_view dname,
                          unsigned flags) {
  return SyncedIf(opt_.dirsync, MoveEntry(sp_ino, sname, dp_ino, dname, flags));
}

Status Filesystem::MoveEntry(uint64_t sp_ino, std::string_view sname, uint64_t dp_ino, std::string_view dname,
                             unsigned flags) {
  DEFERFS_RETURN_IF_ERROR(CheckWritable());
  DEFERFS_RETURN_IF_ERROR(CheckName(sname));
  DEFERFS_RETURN_IF_ERROR(CheckName(dname));
  if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)) return Status::Invalid("unsupported rename flags");
  if ((flags & RENAME_NOREPLACE) && (flags & RENAME_EXCHANGE)) return Status::Invalid("bad rename flags");
  std::lock_guard ns(ns_mu_);

  DirEntry se, de;
  DEFERFS_RETURN_IF_ERROR(meta_->Lookup(sp_ino, sname, &se));
  Status dst = meta_->Lookup(dp_ino, dname, &de);
  if (!dst.ok() && dst.err() != ENOENT) return dst;
  bool target_exists = dst.ok();
  if ((flags & RENAME_EXCHANGE) && !target_exists) return Status::Error(ENOENT, "no target to exchange");
  if ((flags & RENAME_NOREPLACE) && target_exists) return Status::Error(EEXIST, "target exists");
  if (target_exists && de.ino == se.ino) return Status::Ok();  // same inode: POSIX says do nothing

  Inode *sp, *dp, *src, *dstn = nullptr;
  DEFERFS_RETURN_IF_ERROR(GetLocked(sp_ino, &sp));
  DEFERFS_RETURN_IF_ERROR(GetLocked(dp_ino, &dp));
  DEFERFS_RETURN_IF_ERROR(GetLocked(se.ino, &src));
  if (target_exists) DEFERFS_RETURN_IF_ERROR(GetLocked(de.ino, &dstn));
  InodeLocks locks{sp, dp, src, dstn};
  if (!dp->is_dir()) return Status::Error(ENOTDIR, "not a directory");

  // A directory may not move below itself (the VFS checks too; this keeps the tree a tree).
  auto is_ancestor = [&](uint64_t anc, uint64_t ino) -> Status {
    for (uint64_t cur = ino;;) {
      if (cur == anc) return Status::Error(EINVAL, "would move a directory into itself");
      if (cur == kRootIno) return Status::Ok();
      InodeRecord r;
      DEFERFS_RETURN_IF_ERROR(meta_->GetInode(cur, &r));
      cur = r.parent;
    }
  };
  if (src->is_dir() && sp_ino != dp_ino) DEFERFS_RETURN_IF_ERROR(is_ancestor(src->ino, dp_ino));
  if ((flags & RENAME_EXCHANGE) && dstn->is_dir() && sp_ino != dp_ino) {
    DEFERFS_RETURN_IF_ERROR(is_ancestor(dstn->ino, sp_ino));
  }

  if (target_exists && !(flags & RENAME_EXCHANGE)) {
    if (src->is_dir() && !dstn->is_dir()) return Status::Error(ENOTDIR, "target is not a directory");
    if (!src->is_dir() && dstn->is_dir()) return Status::Error(EISDIR, "target is a directory");
    if (dstn->is_dir()) {
      bool any;
      DEFERFS_RETURN_IF_ERROR(meta_->HasEntries(dstn->ino, &any));
      if (any) return Status::Error(ENOTEMPTY, "target directory not empty");
    }
  }

  InodeRecord sp_save = sp->rec, dp_save = dp->rec, src_save = src->rec;
  InodeRecord dst_save = dstn ? dstn->rec : InodeRecord{};
  int64_t now = NowNs();
  MetaBatch b;
  std::vector<BlockRange> freed;

  // Moves inode `mv` into directory `to` under entry `ne`, from directory `from`.
  auto place = [&](Inode* mv, Inode* from, Inode* to, DirEntry ne) {
    ne.ino = mv->ino;
    ne.mode = mv->rec.mode & S_IFMT;
    b.PutDirEntry(to->ino, ne);
    mv->rec.ctime_ns = now;
    if (mv->is_dir() && from != to) {
      mv->rec.parent = to->ino;
      from->rec.nlink--;
      to->rec.nlink++;
    }
  };

  if (flags & RENAME_EXCHANGE) {
    place(src, sp, dp, de);  // src takes the target's slot (and cookie)
    place(dstn, dp, sp, se);
  } else {
    if (target_exists) {
      DropLink(dp, de, dstn, now, &b, &freed);  // unlinks the replaced inode
    }
    b.DeleteDirEntry(sp_ino, se);
    DirEntry ne{std::string(dname), 0, 0, dp->rec.next_cookie++};
    place(src, sp, dp, ne);
  }
  sp->rec.mtime_ns = sp->rec.ctime_ns = now;
  dp->rec.mtime_ns = dp->rec.ctime_ns = now;
  b.PutInode(sp->rec);
  b.PutInode(dp->rec);
  b.PutInode(src->rec);
  if (dstn && !dstn->deleted) b.PutInode(dstn->rec);

  Status st = Commit(&b);
  if (!st.ok()) {
    sp->rec = sp_save;
    dp->rec = dp_save;
    src->rec = src_save;
    if (dstn) {
      dstn->rec = dst_save;
      dstn->deleted = false;
    }
    return st;
  }
  FreeBlocksLater(freed);
  if (dstn && dstn->deleted) live_inodes_--;
  if (dstn) inodes_.MaybeEvict(dstn);
  return Status::Ok();
}

Status Filesystem::ReadLink(uint64_t ino, std::string* target) {
  std::lock_guard ns(ns_mu_);
  Inode* inode;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &inode));
  if (!S_ISLNK(inode->rec.mode)) return Status::Invalid("not a symlink");
  return meta_->GetSymlink(ino, target);
}

Status Filesystem::ReadDir(uint64_t ino, uint64_t off, bool plus, const DirEmitter& emit) {
  std::lock_guard ns(ns_mu_);
  Inode* dir;
  DEFERFS_RETURN_IF_ERROR(GetLocked(ino, &dir));
  if (!dir->is_dir()) return Status::Error(ENOTDIR, "not a directory");
  struct stat st {};
  // "." and ".." take offsets 1 and 2; readdirplus does not count them as lookups.
  if (off < 1) {
    std::lock_guard l(dir->mu);
    FillStat(*dir, &st);
    if (!emit(".", st, 1)) return Status::Ok();
  }
  if (off < 2) {
    Inode* up;
    st = {};
    uint64_t up_ino = dir->ino == kRootIno ? kRootIno : dir->rec.parent;
    if (inodes_.Get(up_ino, &up).ok()) {
      std::lock_guard l(up->mu);
      FillStat(*up, &st);
    }
    st.st_ino = up_ino;
    st.st_mode = S_IFDIR;
    if (!emit("..", st, 2)) return Status::Ok();
  }
  if (dir->rec.nlink == 0) return Status::Ok();  // removed: no entries, and none of its keys may be read
  Status inner;
  Status scan = meta_->ReadDir(ino, std::max<uint64_t>(off, 2), [&](const DirEntry& e) {
    struct stat est {};
    Inode* child = nullptr;
    if (plus) {
      inner = inodes_.Get(e.ino, &child);
      if (!inner.ok()) return false;
      std::lock_guard l(child->mu);
      FillStat(*child, &est);
    } else {
      est.st_ino = e.ino;
      est.st_mode = e.mode;
    }
    if (!emit(e.name, est, e.cookie)) {
      if (child) inodes_.MaybeEvict(child);
      return false;
    }
    if (child) child->nlookup++;
    return true;
  });
  return inner.ok() ? scan : inner;
}

}  // namespace deferfs
