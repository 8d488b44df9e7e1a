// Inode: a file's in-memory state — its persisted record plus the kernel's
// references to it. InodeTable: the inodes the kernel currently knows.
// Locking: `mu` guards rec and the data-path state; nlookup, open_count and
// deleted, and the whole InodeTable, are guarded by Filesystem's ns_mu_.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "backend/metadata.h"
#include "backend/status.h"

namespace deferfs {

struct Inode {
  explicit Inode(const InodeRecord& r) : ino(r.ino), rec(r) {}

  const uint64_t ino;
  std::mutex mu;
  InodeRecord rec;  // guarded by mu

  uint64_t nlookup = 0;     // the kernel's lookup count (FUSE forget protocol)
  uint32_t open_count = 0;  // open file handles
  bool deleted = false;     // record gone from the store; kept until forgotten

  bool is_dir() const { return S_ISDIR(rec.mode); }
  bool is_reg() const { return S_ISREG(rec.mode); }
};

class InodeTable {
 public:
  explicit InodeTable(MetaStore* meta) : meta_(meta) {}

  // The cached inode, or loads it from the store (ENOENT if it has none).
  Status Get(uint64_t ino, Inode** out);
  // Caches a record just created by the caller.
  Inode* Insert(const InodeRecord& rec);
  // Drops the inode if the kernel no longer references it and nothing has it open.
  void MaybeEvict(Inode* inode);
  size_t size() const { return map_.size(); }

 private:
  MetaStore* meta_;
  std::unordered_map<uint64_t, std::unique_ptr<Inode>> map_;
};

}  // namespace deferfs
