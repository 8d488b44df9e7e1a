// MetaStore: the filesystem's metadata in one embedded RocksDB — inodes,
// directory entries, symlink targets, xattrs, extents, orphans, counters.
// Every multi-key change is one MetaBatch committed atomically.
// Thread-safe (RocksDB is); callers serialize read-modify-write sequences.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "backend/status.h"
#include "backend/superblock.h"

namespace rocksdb {
class DB;
class WriteBatch;
struct ReadOptions;
}  // namespace rocksdb

namespace deferfs {

inline constexpr uint64_t kRootIno = 1;
// Readdir offsets 1 and 2 are "." and ".."; entry cookies start above them.
inline constexpr uint64_t kFirstDirCookie = 3;

// An inode as stored. Times are nanoseconds since the epoch.
struct InodeRecord {
  uint64_t ino = 0;
  uint32_t mode = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint32_t nlink = 0;
  uint64_t size = 0;
  uint64_t rdev = 0;
  int64_t atime_ns = 0;
  int64_t mtime_ns = 0;
  int64_t ctime_ns = 0;
  int64_t crtime_ns = 0;
  uint64_t parent = 0;       // directories: the ino ".." names
  uint64_t next_cookie = 0;  // directories: next readdir cookie to hand out
};

// A directory entry. `cookie` is its readdir offset: unique within the
// directory, never reused, so offsets stay valid across inserts and deletes.
struct DirEntry {
  std::string name;
  uint64_t ino = 0;
  uint32_t mode = 0;  // file type bits only
  uint64_t cookie = 0;
};

struct ExtentRecord {
  uint64_t lblk = 0;
  uint64_t len = 0;
  uint64_t pblk = 0;
  uint8_t state = 0;  // fs::ExtentState
};

// A set of changes applied atomically by MetaStore::Commit. Not thread-safe.
class MetaBatch {
 public:
  MetaBatch();
  ~MetaBatch();
  MetaBatch(const MetaBatch&) = delete;
  MetaBatch& operator=(const MetaBatch&) = delete;

  void PutInode(const InodeRecord& rec);
  // Deletes the inode and everything keyed by it (symlink, xattrs, extents, orphan mark).
  void DeleteInode(uint64_t ino);
  void PutDirEntry(uint64_t dir, const DirEntry& e);
  void DeleteDirEntry(uint64_t dir, const DirEntry& e);
  void PutSymlink(uint64_t ino, std::string_view target);
  void PutXattr(uint64_t ino, std::string_view name, std::string_view value);
  void DeleteXattr(uint64_t ino, std::string_view name);
  void PutExtent(uint64_t ino, const ExtentRecord& e);
  void DeleteExtent(uint64_t ino, uint64_t lblk);
  void PutOrphan(uint64_t ino);
  void DeleteOrphan(uint64_t ino);
  void PutNextIno(uint64_t next);

  bool empty() const;

 private:
  friend class MetaStore;
  std::unique_ptr<rocksdb::WriteBatch> wb_;
};

class MetaStore {
 public:
  struct Private {};  // lets only Create/Open construct, through make_unique
  MetaStore(Private, std::unique_ptr<rocksdb::DB> db);
  ~MetaStore();

  // mkfs: creates a fresh store in `dir` (which must not exist) holding the
  // pairing record for `uuid` and the root directory owned by uid/gid.
  static Status Create(const std::string& dir, const Uuid& uuid, uint32_t uid, uint32_t gid);
  // mount/fsck: opens the store in `dir` and checks it belongs to `uuid`.
  static Status Open(const std::string& dir, const Uuid& uuid, std::unique_ptr<MetaStore>* out);
  // True if `dir` holds a deferfs store for `uuid` (used by mkfs --force checks).
  static bool Exists(const std::string& dir);

  Status GetInode(uint64_t ino, InodeRecord* rec);
  // ENOENT when `name` is not in `dir`.
  Status Lookup(uint64_t dir, std::string_view name, DirEntry* e);
  // Calls fn for entries with cookie > after, in cookie order, until fn returns false.
  Status ReadDir(uint64_t dir, uint64_t after, const std::function<bool(const DirEntry&)>& fn);
  // True if `dir` has at least one entry.
  Status HasEntries(uint64_t dir, bool* any);
  Status GetSymlink(uint64_t ino, std::string* target);
  Status GetXattr(uint64_t ino, std::string_view name, std::string* value);  // ENODATA if missing
  Status ListXattrs(uint64_t ino, std::vector<std::string>* names);
  Status ForEachExtent(uint64_t ino, const std::function<void(const ExtentRecord&)>& fn);
  // Every extent of every inode (allocator rebuild, fsck).
  Status ForEachExtentAll(const std::function<void(uint64_t ino, const ExtentRecord&)>& fn);
  Status ForEachInode(const std::function<void(const InodeRecord&)>& fn);
  Status ListOrphans(std::vector<uint64_t>* inos);
  // The first inode number never handed out.
  uint64_t next_ino() const { return next_ino_; }

  // sync=true makes the batch durable (WAL fsync) before returning.
  Status Commit(MetaBatch* batch, bool sync = false);
  // Makes every committed batch durable.
  Status SyncWal();

 private:
  Status LookupAt(const rocksdb::ReadOptions& ro, uint64_t dir, std::string_view name, DirEntry* e);

  std::unique_ptr<rocksdb::DB> db_;
  uint64_t next_ino_ = kRootIno + 1;
};

}  // namespace deferfs
