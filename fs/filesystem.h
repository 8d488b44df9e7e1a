// Filesystem: the POSIX operations of one mounted deferfs, independent of
// FUSE (fs/fuse_ops.cc adapts them). Owns the device, metadata store and
// inode table. Thread-safe: namespace operations serialize on ns_mu_; the data
// path reaches inodes through open file handles and takes only Inode::mu.
#pragma once

#include <sys/stat.h>
#include <sys/statvfs.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "backend/device.h"
#include "backend/metadata.h"
#include "backend/status.h"
#include "backend/superblock.h"
#include "fs/inode.h"

namespace deferfs {

// Who is asking: from the FUSE request context.
struct Caller {
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint32_t umask = 0;
  // Supplementary group membership, asked only when a rule needs it.
  std::function<bool(uint32_t gid)> in_group;
};

// Attribute changes, as FUSE setattr carries them.
struct SetAttrRequest {
  enum : uint32_t {
    kMode = 1 << 0, kUid = 1 << 1, kGid = 1 << 2, kSize = 1 << 3,
    kAtime = 1 << 4, kMtime = 1 << 5, kAtimeNow = 1 << 6, kMtimeNow = 1 << 7, kCtime = 1 << 8,
  };
  uint32_t valid = 0;
  struct stat attr {};
};

class Filesystem {
 public:
  Filesystem(std::unique_ptr<Device> dev, std::unique_ptr<MetaStore> meta, const Superblock& sb);
  ~Filesystem();

  // Mount-time recovery: frees orphans (unlinked while open at a crash).
  Status Recover();

  // Entry-returning operations count one kernel lookup reference on success.
  Status Lookup(uint64_t parent, std::string_view name, struct stat* out);
  void Forget(uint64_t ino, uint64_t nlookup);
  Status GetAttr(uint64_t ino, struct stat* out);
  Status SetAttr(uint64_t ino, const SetAttrRequest& req, struct stat* out);
  Status Mknod(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode, uint64_t rdev,
               struct stat* out);
  Status Mkdir(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode, struct stat* out);
  Status Symlink(const Caller& c, uint64_t parent, std::string_view name, std::string_view target,
                 struct stat* out);
  Status Link(uint64_t ino, uint64_t parent, std::string_view name, struct stat* out);
  Status Unlink(uint64_t parent, std::string_view name);
  Status Rmdir(uint64_t parent, std::string_view name);
  Status Rename(uint64_t parent, std::string_view name, uint64_t newparent, std::string_view newname,
                unsigned flags);
  Status ReadLink(uint64_t ino, std::string* target);

  // Open file handles pin the inode (and, for the data path, its state).
  Status Open(uint64_t ino);
  Status Create(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode, struct stat* out);
  void Release(uint64_t ino);

  // Emits entries after readdir offset `off`. `emit` returns false when the
  // reply buffer is full; that entry is not consumed (nor, for plus, counted).
  using DirEmitter = std::function<bool(std::string_view name, const struct stat& st, uint64_t next_off)>;
  Status ReadDir(uint64_t ino, uint64_t off, bool plus, const DirEmitter& emit);

  Status StatFs(struct statvfs* out);
  Status SetXattr(uint64_t ino, std::string_view name, std::string_view value, int flags);
  Status GetXattr(uint64_t ino, std::string_view name, std::string* value);
  Status ListXattr(uint64_t ino, std::string* names);  // NUL-separated
  Status RemoveXattr(uint64_t ino, std::string_view name);

  // Durability: the metadata WAL synced and the backing device flushed.
  Status Sync();

  const Superblock& superblock() const { return sb_; }

 private:
  Status GetLocked(uint64_t ino, Inode** out);
  Status CheckName(std::string_view name) const;
  // Creates an inode named `name` in `parent`: the one path for mknod, mkdir, symlink, create.
  Status CreateNode(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode,
                    uint64_t rdev, std::string_view symlink_target, struct stat* out);
  // Drops one link of `victim` (named by `e` in `dir`) into `b`.
  void DropLink(Inode* dir, const DirEntry& e, Inode* victim, int64_t now, MetaBatch* b);
  // Deletes a dead inode's record (and blocks) if nothing holds it open.
  void MaybeDestroy(Inode* inode, MetaBatch* b);
  void FillStat(const Inode& inode, struct stat* st) const;
  Status Commit(MetaBatch* b);

  std::unique_ptr<Device> dev_;
  std::unique_ptr<MetaStore> meta_;
  const Superblock sb_;

  std::mutex ns_mu_;
  InodeTable inodes_;  // guarded by ns_mu_
  uint64_t next_ino_;  // guarded by ns_mu_
};

int64_t NowNs();

}  // namespace deferfs
