// MetaStore: the filesystem's metadata in one embedded RocksDB — inodes,
// directory entries, symlink targets, xattrs, extents, orphans, counters.
// Every multi-key change is one MetaBatch committed atomically.
// Thread-safe (RocksDB is); callers serialize read-modify-write sequences.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "backend/data_barrier.h"
#include "backend/status.h"
#include "backend/superblock.h"
#include "backend/unique_fd.h"

namespace rocksdb {
class DB;
class Env;
class WriteBatch;
struct ReadOptions;
}  // namespace rocksdb

namespace deferfs {

class UndoLog;

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

// fsck: a record that cannot be decoded. `key` is opaque outside the store;
// `what` says which record it is and why, as one fsck line.
struct CorruptRecord {
  enum class Kind { kInode, kDirEntry, kExtent, kKey };  // kKey: a key of no record's shape
  Kind kind = Kind::kInode;
  uint64_t ino = 0;  // the inode the record belongs to (the directory's, for an entry)
  std::string what;
  std::string key;
};
using CorruptFn = std::function<void(CorruptRecord)>;

// A set of changes applied atomically by MetaStore::Commit. Not thread-safe.
class MetaBatch {
 public:
  MetaBatch();
  ~MetaBatch();
  MetaBatch(const MetaBatch&) = delete;
  MetaBatch& operator=(const MetaBatch&) = delete;

  void PutInode(const InodeRecord& rec);
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
  void DeleteCorrupt(const CorruptRecord& r);

  bool empty() const;
  // Changes in the batch: one per key put or deleted.
  size_t size() const;
  // The data this batch makes reachable is already on stable media (FUA
  // writes): its commit need not wait for a device flush (see DataBarrier).
  void set_data_durable() { data_durable_ = true; }

 private:
  friend class MetaStore;
  std::unique_ptr<rocksdb::WriteBatch> wb_;
  bool data_durable_ = false;
};

class MetaStore {
 public:
  struct Private {};  // lets only Create/Open construct, through make_unique
  MetaStore(Private, std::shared_ptr<DataBarrier> barrier, std::unique_ptr<rocksdb::Env> env,
            std::unique_ptr<rocksdb::DB> db);
  ~MetaStore();

  // mkfs: creates a fresh store in `dir` (which must not exist) holding the
  // pairing record for `uuid` and the root directory owned by uid/gid.
  static Status Create(const std::string& dir, const Uuid& uuid, uint32_t uid, uint32_t gid);
  // mount: opens the store in `dir` and checks it belongs to `uuid`. With
  // `undo_log` (testing only) the store's files and syncs are logged there.
  static Status Open(const std::string& dir, const Uuid& uuid, std::unique_ptr<MetaStore>* out,
                     UndoLog* undo_log = nullptr);
  // fsck: the same, but a missing or corrupt inode counter is left for fsck
  // to report and repair: next_ino() is 0.
  static Status OpenForFsck(const std::string& dir, const Uuid& uuid, std::unique_ptr<MetaStore>* out);
  // ro mounts: the same checks, and nothing in `dir` is ever written;
  // Commit() fails with EROFS.
  static Status OpenReadOnly(const std::string& dir, const Uuid& uuid, std::unique_ptr<MetaStore>* out);
  // True if `dir` holds a RocksDB store (its CURRENT file); opens nothing.
  static bool Exists(const std::string& dir);
  // Whether `dir` is the store of the filesystem `uuid`, by the checks Open
  // makes (a store, with the pairing record for `uuid`); writes nothing.
  static Status CheckPaired(const std::string& dir, const Uuid& uuid);
  // Whether `dir` is a deferfs metadata store, of any filesystem. Reads only.
  static bool IsStore(const std::string& dir);
  // Takes, for as long as `held` is open, the lock every mount or fsck of
  // the store in `dir` holds (RocksDB's LOCK file: a read-write open's write
  // lock, a read-only mount's read lock), so that none can open it meanwhile.
  // EBUSY while a mount, fsck or mkfs has it open; Ok with nothing held if
  // it has no LOCK.
  static Status LockIdle(const std::string& dir, UniqueFd* held);

  Status GetInode(uint64_t ino, InodeRecord* rec);
  // Adds to `b` the deletion of inode `ino` and of everything keyed by it
  // (symlink, xattrs, extents, orphan mark), key by key as the store holds
  // them now (committed ones: not puts earlier in `b`). Not a range deletion
  // (but for thousands of keys, or if the scan fails): RocksDB 7
  // re-fragments every range tombstone in the memtable on each read, so the
  // one each deleted inode left made every later read slower, and a run of
  // unlinks quadratic.
  void DeleteInode(uint64_t ino, MetaBatch* b);
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
  // A corrupt record stops these scans with an IoError, or, given
  // `on_corrupt` (fsck), is passed to it and skipped.
  Status ForEachExtentAll(const std::function<void(uint64_t ino, const ExtentRecord&)>& fn,
                          const CorruptFn& on_corrupt = nullptr);
  Status ForEachInode(const std::function<void(const InodeRecord&)>& fn, const CorruptFn& on_corrupt = nullptr);
  Status ListOrphans(std::vector<uint64_t>* inos);
  // How many inode records there are (statfs's used inodes).
  Status CountInodes(uint64_t* n);
  // fsck: every directory entry of every directory, by dir then name; every
  // readdir cookie record; the owners of symlink targets and of xattrs,
  // ascending and distinct.
  Status ForEachDirEntryAll(const std::function<void(uint64_t dir, const DirEntry&)>& fn,
                            const CorruptFn& on_corrupt = nullptr);
  Status ForEachCookieAll(const std::function<void(uint64_t dir, uint64_t cookie, std::string_view name)>& fn);
  // fsck: every key this format never writes (an unknown prefix, or a length
  // its prefix never has), which every scan above skips; `ino` is 0.
  Status ForEachMalformedKey(const CorruptFn& fn);
  Status ListSymlinkOwners(std::vector<uint64_t>* inos);
  Status ListXattrOwners(std::vector<uint64_t>* inos);
  // The first inode number never handed out (0: no valid counter, OpenForFsck).
  uint64_t next_ino() const { return next_ino_; }

  // Commits are atomic and visible at once, but reach the WAL file only at
  // the next SyncWal() (or when RocksDB's WAL buffer fills): the store writes
  // nothing to its filesystem before the data it references is flushed, see
  // DataBarrier. A crash keeps a prefix of the commits: everything up to the
  // last SyncWal() at least. sync=true is Commit then SyncWal.
  Status Commit(MetaBatch* batch, bool sync = false);
  // Commit for batches of only puts and deletes of inode and extent
  // records (any other batch goes to Commit() at once), which may reach
  // RocksDB later: held in memory and written, sorted by key, as one batch
  // before the next Commit() or SyncWal(), a scan of all inodes or extents,
  // or a read of an inode or extents they change (reads of other inodes do
  // not wait for them), or by the store's own thread once kDeferredOps
  // changes are held (a store from Open(); else the caller does). So every
  // commit still lands in order, random keys turn into nearly sequential
  // memtable inserts (RocksDB's skiplist reuses the previous insert's
  // position), and the caller (a write's end_io) does not pay for them. A
  // deferred batch that fails to land fails every later Commit(),
  // CommitDeferred(), SyncWal(), and every later read of inodes or extents.
  Status CommitDeferred(MetaBatch* batch);
  static constexpr size_t kDeferredOps = 32768;
  // Held beyond this (the thread cannot keep up), CommitDeferred() writes
  // them itself.
  static constexpr size_t kDeferredMaxOps = 4 * kDeferredOps;
  // Makes every committed batch durable; cheap when nothing was committed
  // since the last call.
  Status SyncWal();
  // What orders the store behind data writes. Its flush must be set before
  // the first commit that references data and stay callable until the store
  // is destroyed.
  DataBarrier& barrier() { return *barrier_; }
  // For `deferfs stats`: batches committed, and WAL write-outs with fsync.
  uint64_t commits() const { return commits_.load(std::memory_order_relaxed); }
  uint64_t wal_syncs() const { return wal_syncs_.load(std::memory_order_relaxed); }
  // GetXattr and ListXattrs calls: store reads made for xattrs.
  uint64_t xattr_reads() const { return xattr_reads_.load(std::memory_order_relaxed); }
  // Changes CommitDeferred() took that are not in RocksDB yet.
  size_t deferred_ops() const { return deferred_ops_.load(std::memory_order_relaxed); }

 private:
  Status LookupAt(const rocksdb::ReadOptions& ro, uint64_t dir, std::string_view name, DirEntry* e);
  static Status OpenReadWrite(const std::string& dir, const Uuid& uuid, std::unique_ptr<MetaStore>* out,
                              UndoLog* undo_log = nullptr);
  Status LoadInodeCounter(const std::string& dir);
  // Writes the deferred changes, if any (commit_mu_ held, or taken).
  Status ApplyDeferred();
  Status ApplyDeferredLocked();
  // ApplyDeferred for a read of `ino`'s inode or extents: writes out (or
  // waits for) only a write-out that holds changes to it.
  Status ApplyDeferredFor(uint64_t ino);
  void DeferredWriterMain();

  struct DeferredOp {
    std::string key, value;
    bool del;
  };

  std::shared_ptr<DataBarrier> barrier_;
  std::unique_ptr<rocksdb::Env> env_;  // the ordered file system; outlives db_
  std::unique_ptr<rocksdb::DB> db_;
  bool read_only_ = false;           // OpenReadOnly: Commit() refuses
  UniqueFd read_lock_;               // OpenReadOnly: a read lock on LOCK (see LockIdle)
  std::atomic<uint64_t> commits_{0};  // batches taken by Commit() and CommitDeferred()
  std::atomic<uint64_t> landed_{0};   // of those, the ones in RocksDB (the WAL buffer)
  std::atomic<uint64_t> synced_{0};   // landed_ covered by the last SyncWal()
  std::atomic<uint64_t> wal_syncs_{0};
  std::atomic<uint64_t> xattr_reads_{0};
  std::mutex commit_mu_;              // one Write() at a time (taken before deferred_mu_)
  std::mutex deferred_mu_;            // guards deferred_*, writer_stop_
  std::condition_variable deferred_cv_;
  std::vector<DeferredOp> deferred_;  // in commit order
  uint64_t deferred_batches_ = 0;     // the batches deferred_ holds
  // Write-outs are numbered: deferred_ goes out with writeouts_taken_ + 1.
  // held_inos_: inode -> the write-out that lands its last held change, kept
  // until that one has landed.
  std::unordered_map<uint64_t, uint64_t> held_inos_;
  uint64_t writeouts_taken_ = 0;
  uint64_t writeouts_landed_ = 0;
  std::atomic<size_t> deferred_ops_{0};  // held or being written: not yet readable from RocksDB
  Status deferred_error_;
  bool writer_stop_ = false;
  std::thread writer_;  // Open()'s stores only
  std::mutex sync_mu_;                // one SyncWal() at a time
  uint64_t next_ino_ = kRootIno + 1;
};

}  // namespace deferfs
