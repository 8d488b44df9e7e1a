// Filesystem: the POSIX operations of one mounted deferfs, independent of
// FUSE (fs/fuse_ops.cc adapts them). Owns the device, metadata store, inode
// table, allocator, pollers, completion threads and the dio engine.
// Thread-safe: namespace operations serialize on ns_mu_ (and never wait for
// IO while holding it); the data path reaches inodes through open file
// handles and takes Inode::iolock and Inode::mu (see fs/inode.h).
//
// Crash consistency (daemon killed or power lost), the ordering it rests on:
//  1. Blocks become reachable only by a metadata commit made after their
//     data write completed: allocations live in memory as UNWRITTEN+NEW until
//     the write's end_io commits "extent written, size" (WriteEndIo). A crash
//     before that leaves the blocks free and the range a hole.
//  2. A commit reaches stable storage only behind a device flush: the store's
//     file system calls DataBarrier::Pass() before any WAL, table or manifest
//     byte goes to the OS (backend/data_barrier.h), so the host page cache can
//     never persist a record ahead of the data it references.
//  3. Durability points (fsync, fdatasync, O_DSYNC, the commit interval,
//     unmount) flush the device, then write out and fsync the WAL. (Linux
//     does not forward syncfs(2) to FUSE servers other than virtiofs.)
//     O_DSYNC data goes out FUA and its commit skips the flush it does not owe.
//     fdatasync and O_DSYNC skip the WAL when every commit of the file is
//     durable (Inode::meta_epoch <= synced_epoch_; its creation and a reload
//     from the store count as commits): only a pure overwrite's mtime, which
//     they do not owe, is then left.
//  4. A freed block is reused only after the commit that freed it is durable
//     (pending_free_, released by SyncMeta), so after a crash no block belongs
//     to two files and no file shows another's old bytes.
//  5. RocksDB recovers a prefix of the commits: what a crash loses is the
//     tail since the last durability point, never a middle, and each
//     multi-key change (rename, unlink, extent conversion) is one batch.
// tests/mount/crash_test.cc kills the daemon mid-workload to check 1, 3-5;
// 2 is what makes the same hold when the machine, not the daemon, dies.
#pragma once

#include <sys/stat.h>
#include <sys/statvfs.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <mutex>
#include <utility>
#include <string>
#include <string_view>
#include <vector>

#include "backend/allocator.h"
#include "backend/device.h"
#include "backend/metadata.h"
#include "backend/poller.h"
#include "backend/status.h"
#include "backend/superblock.h"
#include "backend/clock.h"
#include "fs/completion_mode.h"
#include "fs/dio.h"
#include "fs/inode.h"
#include "fs/io_buffers.h"
#include "fs/iomap.h"
#include "fs/journal_commit.h"
#include "fs/live_gauges.h"
#include "fs/workqueue.h"

namespace deferfs {

// Who is asking: from the FUSE request context.
struct Caller {
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint32_t umask = 0;
  // Supplementary group membership, asked only when a rule needs it.
  std::function<bool(uint32_t gid)> in_group;
};

// Kernel lookup references to drop (FUSE forget).
struct Forgotten {
  uint64_t ino;
  uint64_t nlookup;
};

// Attribute changes, as FUSE setattr carries them.
struct SetAttrRequest {
  enum : uint32_t {
    kMode = 1 << 0, kUid = 1 << 1, kGid = 1 << 2, kSize = 1 << 3,
    kAtime = 1 << 4, kMtime = 1 << 5, kAtimeNow = 1 << 6, kMtimeNow = 1 << 7, kCtime = 1 << 8,
  };
  uint32_t valid = 0;
  struct stat attr {};

  // Sets in `rec` the attributes but the size, and ctime (to `now` unless
  // given); `now` for the *Now ones.
  void ApplyTo(InodeRecord* rec, int64_t now) const;
};

struct FsOptions {
  CompletionMode completion = CompletionMode::kAuto;
  unsigned pollers = 1;
  unsigned cthreads = 1;
  unsigned ring_depth = 256;
  unsigned io_buffers = 128;  // 1 MiB + 4 KiB each, registered with every ring
  unsigned workers = 1;       // reported only: the worker loop lives in mount/
  bool read_only = false;     // mounted ro: every change fails with EROFS; we commit nothing
  // Mounted sync: every write is O_DSYNC and every commit a durability point.
  bool sync = false;
  // Mounted dirsync (sync implies it): a change to a directory is durable when it returns.
  bool dirsync = false;
  // The -o max_read= passed to the kernel: FUSE INIT must agree on it (0: none).
  uint32_t max_read = 0;
  // Seconds between background metadata commits (fs/journal_commit.h): the
  // most a crash can lose of what was never fsync'ed.
  unsigned commit_interval_s = 5;
  bool fault_inject = false;  // testing only: pollers fail tagged bios (backend/fault_inject.h)
};

// Counters of the FUSE transport (mount/), reported under "fuse".
struct FuseTransportStats {
  std::atomic<uint64_t> dev_requests{0};    // read(2) from /dev/fuse
  std::atomic<uint64_t> ring_requests{0};   // through a FUSE ring entry (transport=uring)
  std::atomic<uint64_t> remote_commits{0};  // ring replies made off the owning worker
  std::atomic<uint64_t> ring_copied_bytes{0};  // reply payload copied into a ring slot
  std::atomic<uint64_t> ring_buffers{0};    // gauge: IO buffers the ring slots keep
};

// Bytes of an IoBuffer: the largest FUSE request (1 MiB payload behind a
// 4 KiB-aligned header slot), and the block span of any 1 MiB unaligned IO.
inline constexpr size_t kMaxIo = 1 << 20;
inline constexpr size_t kIoBufferBytes = kMaxIo + 4096;
// The largest file size: the kernel's MAX_LFS_FILESIZE (off_t's limit) rounded
// down to a block, so that byte and block arithmetic near it cannot overflow.
// Writes past it fail with EFBIG (or stop short at it), as do truncate and
// fallocate beyond it.
inline constexpr uint64_t kMaxFileSize = (uint64_t{1} << 63) - kBlockSize;

class Filesystem {
 public:
  // Recovers (frees orphans), rebuilds the free-space map from the extents,
  // starts pollers and completion threads. Errors are one-line Statuses.
  static Status Mount(std::unique_ptr<Device> dev, std::unique_ptr<MetaStore> meta, const Superblock& sb,
                      const FsOptions& opt, std::unique_ptr<Filesystem>* out);
  ~Filesystem();  // persists dirty inodes, stops threads

  // Entry-returning operations count one kernel lookup reference on success.
  Status Lookup(uint64_t parent, std::string_view name, struct stat* out);
  // The last reference of an unlinked inode deletes it (one commit for all).
  void Forget(std::span<const Forgotten> forgets);
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

  // Open file handles pin the inode: *out is the handle's Inode, valid until Release.
  Status Open(uint64_t ino, Inode** out);
  Status Create(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode, struct stat* out,
                Inode** handle);
  void Release(Inode* inode);

  // The data path (fs/file_ops.cc). iocb->inode is an open handle's inode.
  // Aligned requests (pos, len and buffer 4 KiB-aligned) go through the dio
  // engine and may return kIocbQueued; unaligned ones are read-modify-write,
  // done synchronously under the exclusive IO lock. `buf` is an IoBuffer of
  // the pool. Reads place the data at buf->base + *data_off; `buf` must hold
  // ReadSpan(pos, len) bytes.
  static uint64_t ReadSpan(uint64_t pos, uint64_t len);
  ssize_t ReadIter(Kiocb* iocb, IoBuffer* buf, size_t len, size_t* data_off);
  ssize_t WriteIter(Kiocb* iocb, IoBuffer* buf, const uint8_t* data, size_t len);
  Status Fallocate(Inode* inode, int mode, uint64_t off, uint64_t len);
  Status Lseek(Inode* inode, uint64_t off, int whence, uint64_t* out);
  Status Fsync(Inode* inode, bool datasync);

  // Emits entries after readdir offset `off`. `emit` returns false when the
  // reply buffer is full; that entry is not consumed (nor, for plus, counted).
  using DirEmitter = std::function<bool(std::string_view name, const struct stat& st, uint64_t next_off)>;
  Status ReadDir(uint64_t ino, uint64_t off, bool plus, const DirEmitter& emit);

  Status StatFs(struct statvfs* out);
  Status SetXattr(uint64_t ino, std::string_view name, std::string_view value, int flags);
  Status GetXattr(uint64_t ino, std::string_view name, std::string* value);
  Status ListXattr(uint64_t ino, std::string* names);  // NUL-separated
  Status RemoveXattr(uint64_t ino, std::string_view name);

  // Durability: the backing device flushed, then the metadata WAL synced.
  Status Sync();
  // The first half of Sync: completed data writes durable (fdatasync's all,
  // once the file's commits are).
  Status FlushData();

  // True once a metadata commit or WAL sync failed: from then on every
  // change (and fsync) fails with EIO and reads keep working, so the store
  // never silently falls behind the device (XFS's shutdown). Sticky until unmount.
  bool shut_down() const { return shutdown_.load(std::memory_order_acquire); }
  // Mounted ro. The kernel's ro flag alone does not hold: a remount by
  // mount(2) can drop it without asking us, so every change checks this too.
  bool read_only() const { return opt_.read_only; }
  bool synchronous() const { return opt_.sync; }
  uint32_t max_read() const { return opt_.max_read; }

  const Superblock& superblock() const { return sb_; }
  const Device& device() const { return *dev_; }
  IoBufferPool& buffers() { return *buffers_; }
  DioEngine& engine() { return *engine_; }
  Allocator& allocator() { return *alloc_; }
  CompletionMode completion_mode() const { return opt_.completion; }
  LiveGauges& gauges() { return gauges_; }
  // The FUSE transport, for the stats report: its name ("dev", "uring") and counters.
  void set_transport(const char* name) { transport_.store(name, std::memory_order_relaxed); }
  FuseTransportStats& fuse_stats() { return fuse_stats_; }
  // The FUSE workers' task_work queues, for the stats report.
  void RegisterTaskWork(TaskWork* tw);
  void UnregisterTaskWorks();
  // `deferfs stats`: counters since mount (or the last reset) and latency
  // summaries with their histograms, as one JSON object (fs/stats.cc).
  // reset: start counting anew. Histograms that would take the report (and
  // its NUL) past max_bytes are left out.
  std::string StatsJson(bool reset, size_t max_bytes = SIZE_MAX);

  Filesystem(std::unique_ptr<Device> dev, std::unique_ptr<MetaStore> meta, const Superblock& sb,
             const FsOptions& opt);

 private:
  Status Recover();
  Status Start();
  // EIO once shut down.
  Status CheckLive() const;
  // EROFS on a read-only mount, else CheckLive(): the first check of every
  // operation that changes something.
  Status CheckWritable() const;
  // For a failed metadata write: shuts down (logging once) and returns EIO.
  Status MetaFailed(const Status& st);
  // The write end_io the dio engine calls (fs/file_ops.cc): finished writes
  // to one inode, one or a batch (fs/dio.cc, DioBatch), in one commit.
  int WriteEndIo(std::span<Dio* const> dios);
  // Loads the inode's extent map from the store if not yet. Caller holds mu.
  Status EnsureExtents(Inode* inode);
  // Synchronous block-aligned DIO of [pos, pos+len) to/from buf (an IoBuffer).
  // Writes: `sync_flags` (IOCB_DSYNC, IOCB_SYNC) as for the caller's write;
  // `isize` the file's size if the write ends past EOF, 0: it never extends.
  ssize_t SyncRw(Inode* inode, bool write, uint64_t pos, IoBuffer* buf, size_t len, uint32_t sync_flags = 0,
                 uint64_t isize = 0);
  // Zeroes [from, to) inside one block by read-modify-write, if it is mapped.
  Status ZeroPartialBlock(Inode* inode, uint64_t from, uint64_t to, bool fua = false);
  // Before the size grows to `new_size`: zeroes the old last block past EOF.
  // Caller holds iolock exclusively, with no dio in flight.
  Status ZeroPastEof(Inode* inode, uint64_t new_size);
  // Truncate to req.attr.st_size, under the exclusive IO lock with DIO
  // drained; the request's other attributes change in the same commit.
  Status TruncateLocked(Inode* inode, const SetAttrRequest& req);
  // Adds an extent delta to a batch; the freed blocks wait in pending_free_.
  void ApplyDelta(uint64_t ino, const ExtentDelta& d, MetaBatch* b);
  // Blocks become reusable only once the metadata that freed them is durable
  // (a reused block must never still belong to a file after a power loss).
  void FreeBlocksLater(const std::vector<BlockRange>& freed);
  bool ReclaimFreedBlocks();
  // Syncs the metadata WAL, then makes the blocks freed before it reusable.
  Status SyncMeta();
  // Commits a batch that changes `inode` (caller holds inode->mu) and
  // remembers whether it is durable, for O_DSYNC writes (IOMAP_F_DIRTY).
  // Unless it must be durable now (`sync`, or a sync mount), the store holds
  // the batch back and sorts it in with others (MetaStore::CommitDeferred):
  // it holds only inode and extent records, and commits anything else at
  // once. Whatever reads, commits directly or syncs lands the held first.
  Status CommitInode(Inode* inode, MetaBatch* b, bool sync = false);

  Status GetLocked(uint64_t ino, Inode** out);
  Status CheckName(std::string_view name) const;
  // `st`, but first, if `durable` and st is Ok, a SyncMeta(). The namespace
  // and xattr changes of dirsync and sync mounts call it once they have
  // dropped ns_mu_: nothing else waits for their WAL sync, and the syncs of
  // concurrent changes can share one. If the sync fails the change stays
  // in memory (and a create's lookup counted) while the filesystem shuts
  // down: every later change fails with EIO.
  Status SyncedIf(bool durable, Status st);
  // Creates an inode named `name` in `parent`: the one path for mknod, mkdir, symlink, create.
  Status CreateNode(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode,
                    uint64_t rdev, std::string_view symlink_target, struct stat* out);
  // The changes themselves, committed without a sync (see SyncedIf).
  Status AddNode(const Caller& c, uint64_t parent, std::string_view name, uint32_t mode,
                 uint64_t rdev, std::string_view symlink_target, struct stat* out);
  Status AddLink(uint64_t ino, uint64_t parent, std::string_view name, struct stat* out);
  // unlink (rmdir=false) and rmdir.
  Status RemoveEntry(uint64_t parent, std::string_view name, bool rmdir);
  Status MoveEntry(uint64_t parent, std::string_view name, uint64_t newparent, std::string_view newname,
                   unsigned flags);
  Status PutXattr(uint64_t ino, std::string_view name, std::string_view value, int flags);
  Status DeleteXattr(uint64_t ino, std::string_view name);
  // The store's xattr `name` of `inode`, ENODATA without a store read when
  // it has none (Inode::xattrs). ns_mu_ held.
  Status LookupXattr(Inode* inode, std::string_view name, std::string* value);
  // Drops one link of `victim` (named by `e` in `dir`) into `b`.
  void DropLink(Inode* dir, const DirEntry& e, Inode* victim, int64_t now, MetaBatch* b,
                std::vector<BlockRange>* freed);
  // Deletes an unlinked inode's record once nothing holds it: no open file
  // and no kernel reference (the kernel may open an inode it still knows,
  // through /proc/PID/fd or a lookup racing the unlink, as it may on ext4).
  // Its blocks go to *freed, for FreeBlocksLater once the batch committed.
  // Caller holds ns_mu_ and mu.
  void MaybeDestroy(Inode* inode, MetaBatch* b, std::vector<BlockRange>* freed);
  // MaybeDestroy's deletion itself; also at unmount, when the kernel holds
  // nothing any more.
  void Destroy(Inode* inode, MetaBatch* b, std::vector<BlockRange>* freed);
  // Caller holds inode.mu.
  void FillStat(Inode& inode, struct stat* st);
  // Every metadata commit goes through here: refused once shut down, and
  // the first failure shuts the filesystem down. may_defer: the store may
  // hold the batch (CommitInode passes it).
  // The `sync` mount option is the callers' to apply (CommitInode, SyncedIf;
  // Forget's deletions of unlinked inodes need none: their orphan marks are
  // durable, and the next mount frees them).
  Status Commit(MetaBatch* b, bool sync = false, bool may_defer = false);

  std::unique_ptr<Device> dev_;
  std::unique_ptr<MetaStore> meta_;
  const Superblock sb_;
  const FsOptions opt_;

  // Every non-synced commit belongs to the current WAL epoch; a WAL sync
  // makes all epochs up to the one it closed durable.
  std::atomic<uint64_t> wal_epoch_{1};
  std::atomic<uint64_t> synced_epoch_{0};
  std::atomic<bool> shutdown_{false};

  std::unique_ptr<Allocator> alloc_;
  std::mutex free_mu_;
  std::vector<BlockRange> pending_free_;  // guarded by free_mu_
  std::unique_ptr<IoBufferPool> buffers_;
  std::vector<std::unique_ptr<Poller>> pollers_;
  std::unique_ptr<Workqueue> workqueue_;
  std::unique_ptr<IomapOps> iomap_;
  std::unique_ptr<DioEngine> engine_;
  std::unique_ptr<JournalCommit> journal_;

  LiveGauges gauges_;
  FuseTransportStats fuse_stats_;
  std::atomic<const char*> transport_{"dev"};
  std::mutex stats_mu_;
  std::vector<TaskWork*> task_works_;                // guarded by stats_mu_
  std::vector<std::pair<std::string, uint64_t>> stats_base_;  // guarded by stats_mu_

  std::mutex ns_mu_;
  InodeTable inodes_;  // guarded by ns_mu_
  uint64_t next_ino_;         // guarded by ns_mu_
  uint64_t live_inodes_ = 0;  // guarded by ns_mu_: inode records in the store (statfs)
};


}  // namespace deferfs
