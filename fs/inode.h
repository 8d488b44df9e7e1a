// Inode: a file's in-memory state — its persisted record, its extent map, its
// DIO state, and the kernel's references to it. InodeTable: the inodes the
// kernel currently knows.
// Locking, outermost first: iolock (the kernel's i_rwsem: shared while DIO is
// submitted, exclusive for truncate/punch/unaligned IO), then ns_mu_ (only
// namespace ops), then `mu` (rec, extents, dirty: short, never across IO).
// nlookup, open_count, deleted and the InodeTable are guarded by ns_mu_.
#pragma once

#include <sys/stat.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "backend/metadata.h"
#include "backend/status.h"
#include "fs/extent_map.h"
#include "fs/task_work.h"

namespace deferfs {

// A reader/writer lock whose waiters wait through TaskWork::WaitUntil, so a
// worker that waits for it keeps running its deferred completions.
// Writers are preferred: a waiting writer holds off new readers. Thread-safe.
class IoLock {
 public:
  void LockShared();
  void UnlockShared();
  void Lock();
  void Unlock();

 private:
  std::mutex mu_;
  int readers_ = 0;          // guarded by mu_
  bool writer_ = false;      // guarded by mu_
  int writers_waiting_ = 0;  // guarded by mu_
  WaitQueue wq_;
};

struct Inode {
  explicit Inode(const InodeRecord& r) : ino(r.ino), rec(r) {}

  const uint64_t ino;
  std::mutex mu;
  InodeRecord rec;  // guarded by mu
  ExtentMap extents;  // guarded by mu; loaded at first open of a regular file
  bool extents_loaded = false;  // guarded by mu
  // Blocks allocated for in-flight writes into holes: lblk -> (len, pblk).
  // Not in `extents` and not persisted until the write completes, so the
  // extent map always mirrors the metadata store. Guarded by mu.
  std::map<uint64_t, BlockRange> new_extents;
  // rec has in-memory changes not yet committed (timestamps of pure
  // overwrites); persisted by the next commit of this inode, fsync or release.
  bool dirty = false;  // guarded by mu
  // WAL epoch of this inode's last commit that may not be durable yet (see
  // Filesystem::CommitInode); 0 when everything is. An inode starts at the
  // epoch it was cached at: its creation, or commits made before it was last
  // evicted, may not be durable yet. Guarded by mu.
  uint64_t meta_epoch = 0;

  // The last block an unaligned write covered, as it went to the device, so
  // that the next unaligned write into it (a buffered append in pieces, as
  // tar writes its 10 KiB records) need not read it back first. rmw_lblk is
  // guarded by mu and dropped by every other change of the file's blocks
  // (DropRmwBlock); rmw_block's bytes are filled and read only under iolock
  // held exclusive, and freed at the last close (under mu).
  static constexpr uint64_t kNoRmwBlock = UINT64_MAX;
  uint64_t rmw_lblk = kNoRmwBlock;
  std::unique_ptr<uint8_t[]> rmw_block;
  void DropRmwBlock() { rmw_lblk = kNoRmwBlock; }  // caller holds mu

  // The size at which the last block's bytes past EOF were last zeroed on
  // the device (Filesystem::ZeroPastEof), so that async writes beyond it do
  // not each zero it again; reset by a failed write, which may have landed
  // there. kNoSize: not known. Guarded by mu.
  static constexpr uint64_t kNoSize = UINT64_MAX;
  uint64_t zeroed_past = kNoSize;

  IoLock iolock;
  std::atomic<int> dio_count{0};  // in-flight DIOs: inode_dio_begin/end
  WaitQueue dio_wq;               // inode_dio_wait() sleepers

  // Whether the store holds xattrs of this inode, so that getxattr of a file
  // with none (the kernel asks for "security.capability" before every
  // buffered write, in file_remove_privs) needs no store read. kUnknown
  // until a read finds out; removexattr leaves kSome. Guarded by ns_mu_.
  enum class Xattrs : uint8_t { kUnknown, kNone, kSome };
  Xattrs xattrs = Xattrs::kUnknown;

  uint64_t nlookup = 0;     // the kernel's lookup count (FUSE forget protocol)
  uint32_t open_count = 0;  // open file handles
  bool deleted = false;     // record gone from the store (nothing referenced it)

  bool is_dir() const { return S_ISDIR(rec.mode); }
  bool is_reg() const { return S_ISREG(rec.mode); }
};

// The WAL epoch to record in Inode::meta_epoch after a commit has landed.
// A read-modify-write, not a load: SyncMeta bumps the epoch (another RMW),
// then looks at what has landed. Either this RMW comes first, and SyncMeta's
// acquires it and so sees the commit, or it reads the bumped epoch. A plain
// load could miss the bump while SyncWal misses the commit (store
// buffering), recording a commit SyncWal did not cover under the epoch it
// synced.
inline uint64_t EpochAfterCommit(std::atomic<uint64_t>& wal_epoch) {
  return wal_epoch.fetch_add(0, std::memory_order_acq_rel);
}

void inode_dio_begin(Inode* inode);
void inode_dio_end(Inode* inode);
// Waits until no DIO is in flight on the inode, running the caller's
// deferred completions meanwhile (the 6.6 self-deadlock cannot happen).
void inode_dio_wait(Inode* inode);

class InodeTable {
 public:
  // `wal_epoch`: the filesystem's current WAL epoch (Inode::meta_epoch).
  InodeTable(MetaStore* meta, std::atomic<uint64_t>* wal_epoch) : meta_(meta), wal_epoch_(wal_epoch) {}

  // The cached inode, or loads it from the store (ENOENT if it has none).
  Status Get(uint64_t ino, Inode** out);
  // The cached inode, or nullptr.
  Inode* Find(uint64_t ino) {
    auto it = map_.find(ino);
    return it == map_.end() ? nullptr : it->second.get();
  }
  // Caches a record just created by the caller (after its commit landed).
  Inode* Insert(const InodeRecord& rec);
  // Drops the inode if the kernel no longer references it and nothing has it open.
  void MaybeEvict(Inode* inode);
  size_t size() const { return map_.size(); }
  template <typename Fn>
  void ForEach(Fn&& fn) {
    for (auto& [ino, inode] : map_) fn(inode.get());
  }

 private:
  MetaStore* meta_;
  std::atomic<uint64_t>* const wal_epoch_;
  std::unordered_map<uint64_t, std::unique_ptr<Inode>> map_;
};

}  // namespace deferfs
