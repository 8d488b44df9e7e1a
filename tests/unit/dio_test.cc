// The dio engine and its completion modes, through Filesystem's data path:
// a real O_DIRECT backing file, real io_uring pollers, real RocksDB, no FUSE.
// The test thread plays the FUSE worker: its ki_complete pushes a kiocb that
// comes back with dio_complete set onto its own TaskWork (as FuseKiComplete),
// and it waits only through TaskWork::WaitUntil.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backend/data_barrier.h"
#include "backend/device.h"
#include "backend/metadata.h"
#include "backend/superblock.h"
#include "fs/filesystem.h"
#include "fs/fsck.h"
#include "tests/unit/fs_files.h"
#include "tests/unit/temp_dir.h"

namespace deferfs {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t kB = kBlockSize;
constexpr uint64_t kMiB = 1 << 20;
// Every block of the backing starts as this byte: a block handed out without
// being written (or zeroed) would show it.
constexpr uint8_t kStale = 0xA5;
// What read buffers hold before a read: a hole must be zero-filled, not skipped.
constexpr uint8_t kPoison = 0x5A;

uint64_t RoundUp(uint64_t v) { return (v + kB - 1) & ~(kB - 1); }
bool Aligned(uint64_t v) { return (v & (kB - 1)) == 0; }


// Kills the process if the guarded scope has not finished by the deadline:
// a self-deadlock must fail the run, not hang it.
class Watchdog {
 public:
  explicit Watchdog(std::string what, std::chrono::seconds limit = 60s)
      : what_(std::move(what)), thread_([this, limit] {
          std::unique_lock l(mu_);
          if (!cv_.wait_for(l, limit, [this] { return disarmed_; })) {
            std::fprintf(stderr, "\nFATAL: watchdog: %s did not finish within %llds: self-deadlock\n", what_.c_str(),
                         static_cast<long long>(limit.count()));
            std::fflush(stderr);
            std::abort();
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard l(mu_);
      disarmed_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  const std::string what_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool disarmed_ = false;  // guarded by mu_
  std::thread thread_;     // last: starts once the rest exists
};

// Polls without running the calling thread's task_work (so deferred
// completions stay queued). The bound only turns a lost completion into a failure.
template <typename Pred>
[[nodiscard]] bool SpinUntil(Pred pred) {
  for (auto deadline = std::chrono::steady_clock::now() + 30s; std::chrono::steady_clock::now() < deadline;) {
    if (pred()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return pred();
}

// One request as the test issues it. The Kiocb comes first so ki_complete
// gets from the kiocb back to its request (as fs/fuse_io.cc's FuseIo).
struct Req {
  Kiocb iocb;
  TaskWork* issuer = nullptr;
  IoBufferPool* pool = nullptr;
  IoBuffer* buf = nullptr;  // the request's data buffer, back to the pool with the Req
  size_t data_off = 0;      // reads: where the data starts in buf
  size_t len = 0;
  ssize_t started = 0;  // what ReadIter/WriteIter returned

  // Set by ki_complete.
  std::atomic<bool> parked{false};  // came back with dio_complete set: pushed to the issuer
  bool parked_private = false;      // private_data was set when parked
  std::atomic<bool> done{false};    // the final ki_complete ran
  int final_calls = 0;
  ssize_t res = 0;
  std::thread::id completer;

  Req() = default;
  Req(const Req&) = delete;
  Req& operator=(const Req&) = delete;
  ~Req() {
    // A request never outlives its completion (a test that bailed out early
    // must not leave a dangling kiocb on this thread's task_work).
    if (queued()) issuer->WaitUntil([this] { return done.load(std::memory_order_acquire); });
    if (buf) pool->Put(buf);
  }
  bool queued() const { return started == kIocbQueued; }
};
static_assert(std::is_standard_layout_v<Req>);

// The issuer's ki_complete (FuseKiComplete's twin, recording instead of replying).
void RecordComplete(Kiocb* iocb, ssize_t res) {
  Req* r = reinterpret_cast<Req*>(iocb);
  if (iocb->dio_complete) {  // the seed: `res` means nothing, run dio_complete in the issuer
    r->parked_private = iocb->private_data != nullptr;
    r->parked.store(true, std::memory_order_release);
    r->issuer->Push(iocb);
    return;
  }
  r->res = res;
  r->final_calls++;
  r->completer = std::this_thread::get_id();
  TaskWork* issuer = r->issuer;  // r may be gone once done is set
  r->done.store(true, std::memory_order_release);
  issuer->Wake();
}

// Issues requests on one filesystem the way the FUSE layer does for `mode`.
class Io {
 public:
  Io(Filesystem* fs, CompletionMode mode) : fs_(fs), mode_(mode) {}

  // Starts a write; r.started is kIocbQueued or the result. Aligned requests
  // carry their data in a pool buffer (zero-copy, as a FUSE receive buffer).
  ssize_t StartWrite(Req& r, Inode* inode, uint64_t pos, const uint8_t* data, size_t len,
                     uint32_t flags = IOCB_DIO_DEFER) {
    Prepare(r, inode, pos, IOCB_WRITE | flags, len);
    if (Aligned(pos) && Aligned(len) && len <= r.buf->size) {
      std::memcpy(r.buf->base, data, len);
      data = r.buf->base;
    }
    return r.started = fs_->WriteIter(&r.iocb, r.buf, data, len);
  }
  ssize_t StartRead(Req& r, Inode* inode, uint64_t pos, size_t len) {
    Prepare(r, inode, pos, IOCB_DIO_DEFER, len);
    std::memset(r.buf->base, kPoison, r.buf->size);
    return r.started = fs_->ReadIter(&r.iocb, r.buf, len, &r.data_off);
  }

  // The request's result, waiting for (and running) its completion if queued.
  ssize_t Wait(Req& r) {
    if (!r.queued()) {
      // Not queued: the result is final and ki_complete must never run.
      EXPECT_FALSE(r.done.load() || r.parked.load()) << "ki_complete ran for a request that returned " << r.started;
      return r.started;
    }
    TaskWork::Current()->WaitUntil([&r] { return r.done.load(std::memory_order_acquire); });
    EXPECT_EQ(r.final_calls, 1);
    return r.res;
  }

  ssize_t Write(Inode* inode, uint64_t pos, const uint8_t* data, size_t len, uint32_t flags = IOCB_DIO_DEFER) {
    Req r;
    StartWrite(r, inode, pos, data, len, flags);
    return Wait(r);
  }
  ssize_t Write(Inode* inode, uint64_t pos, const std::vector<uint8_t>& data) {
    return Write(inode, pos, data.data(), data.size());
  }
  // Reads into *out (resized to what the read returned); returns the result.
  ssize_t Read(Inode* inode, uint64_t pos, size_t len, std::vector<uint8_t>* out) {
    Req r;
    StartRead(r, inode, pos, len);
    ssize_t res = Wait(r);
    out->clear();
    if (res > 0) out->assign(r.buf->base + r.data_off, r.buf->base + r.data_off + res);
    return res;
  }

 private:
  void Prepare(Req& r, Inode* inode, uint64_t pos, uint32_t flags, size_t len) {
    r.pool = &fs_->buffers();
    r.buf = r.pool->Get();
    r.issuer = TaskWork::Current();
    r.len = len;
    r.iocb.inode = inode;
    r.iocb.pos = pos;
    r.iocb.ki_flags = flags;
    // completion=sync: a synchronous kiocb, as fs/fuse_io.cc builds it.
    if (mode_ != CompletionMode::kSync) r.iocb.ki_complete = RecordComplete;
  }

  Filesystem* fs_;
  CompletionMode mode_;
};

// Where completions ran: a snapshot of the engine's counters.
struct Counts {
  int64_t inl = 0, deferred = 0, wq = 0, sync = 0, at_submit = 0, pure = 0, errors = 0;
};
Counts Snap(DioEngine& e) {
  auto& s = e.stats();
  return Counts{static_cast<int64_t>(s.completed_inline.load()), static_cast<int64_t>(s.completed_deferred.load()),
                static_cast<int64_t>(s.completed_workqueue.load()), static_cast<int64_t>(s.completed_sync.load()),
                static_cast<int64_t>(s.completed_at_submit.load()), static_cast<int64_t>(s.pure_overwrites.load()),
                static_cast<int64_t>(s.errors.load())};
}
Counts operator-(const Counts& a, const Counts& b) {
  return Counts{a.inl - b.inl, a.deferred - b.deferred, a.wq - b.wq, a.sync - b.sync,
                a.at_submit - b.at_submit, a.pure - b.pure, a.errors - b.errors};
}

testing::AssertionResult SameBytes(const uint8_t* got, const uint8_t* want, size_t n, uint64_t file_off) {
  for (size_t i = 0; i < n; i++) {
    if (got[i] != want[i]) {
      return testing::AssertionFailure()
             << "first difference at file offset " << file_off + i << ": got " << int{got[i]} << ", want "
             << int{want[i]} << (got[i] == kStale ? " (the stale device pattern)" : "")
             << (got[i] == kPoison ? " (the read did not fill the buffer)" : "");
    }
  }
  return testing::AssertionSuccess();
}

std::vector<uint8_t> RandomBytes(std::mt19937_64& rng, size_t n) {
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

// The file as it must read: every write applied, zeros wherever nothing was written.
struct Model {
  std::vector<uint8_t> bytes;
  void Write(uint64_t pos, const std::vector<uint8_t>& d) {
    if (bytes.size() < pos + d.size()) bytes.resize(pos + d.size(), 0);
    std::copy(d.begin(), d.end(), bytes.begin() + static_cast<ptrdiff_t>(pos));
  }
  void Zero(uint64_t pos, uint64_t len) {
    if (pos >= bytes.size()) return;
    len = std::min<uint64_t>(len, bytes.size() - pos);
    std::fill_n(bytes.begin() + static_cast<ptrdiff_t>(pos), len, 0);
  }
  void Truncate(uint64_t size) { bytes.resize(size, 0); }
};

struct FsPaths {
  std::string backing, meta;
};

class DioTest : public testing::Test {
 protected:
  void TearDown() override {
    // Nothing of a request may outlive the filesystem that serves it.
    EXPECT_FALSE(TaskWork::Current()->has_pending()) << "a test left deferred completions queued";
  }

  // mkfs of a `bytes` backing pre-filled with kStale, then mount.
  void Format(CompletionMode mode, uint64_t bytes = 64 * kMiB) {
    mode_ = mode;
    paths_ = {dir_.path() + "/backing", dir_.path() + "/meta"};
    {
      UniqueFd fd(open(paths_.backing.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
      ASSERT_TRUE(fd.valid()) << strerror(errno);
      ASSERT_EQ(ftruncate(fd.get(), static_cast<off_t>(bytes)), 0);
      std::vector<uint8_t> chunk(kMiB, kStale);
      for (uint64_t off = 0; off < bytes; off += kMiB) {
        ASSERT_EQ(pwrite(fd.get(), chunk.data(), kMiB, static_cast<off_t>(off)), static_cast<ssize_t>(kMiB));
      }
    }
    Superblock sb;
    sb.uuid = NewUuid();
    sb.device_bytes = bytes;
    sb.created_ns = NowNs();
    {
      std::unique_ptr<Device> dev;
      ASSERT_TRUE(Device::Open(paths_.backing, &dev).ok());
      AlignedBuffer sbuf(kSuperblockBytes, 4096);
      EncodeSuperblock(sb, sbuf.bytes());
      ASSERT_TRUE(dev->WriteSync(0, sbuf.data(), kSuperblockBytes).ok());
      ASSERT_TRUE(dev->FlushSync().ok());
    }
    Status st = MetaStore::Create(paths_.meta, sb.uuid, 0, 0);
    ASSERT_TRUE(st.ok()) << st.message();
    ASSERT_NO_FATAL_FAILURE(Mount());
  }

  // Opens and locks the backing, reads its superblock and opens the store
  // paired with it: for a mount, or offline for fsck.
  static void OpenStore(const FsPaths& p, bool for_fsck, std::unique_ptr<Device>* dev, Superblock* sb,
                        std::unique_ptr<MetaStore>* meta) {
    Status st = Device::Open(p.backing, dev);
    if (st.ok()) st = (*dev)->LockExclusive();
    ASSERT_TRUE(st.ok()) << st.message();
    AlignedBuffer sbuf(kSuperblockBytes, 4096);
    ASSERT_TRUE((*dev)->ReadSync(0, sbuf.data(), kSuperblockBytes).ok());
    st = DecodeSuperblock(sbuf.bytes(), p.backing, sb);
    ASSERT_TRUE(st.ok()) << st.message();
    st = for_fsck ? MetaStore::OpenForFsck(p.meta, sb->uuid, meta) : MetaStore::Open(p.meta, sb->uuid, meta);
    ASSERT_TRUE(st.ok()) << st.message();
  }

  // Opens everything from the files, as `deferfs mount` does.
  void MountFrom(const FsPaths& p, std::unique_ptr<Filesystem>* out) {
    std::unique_ptr<Device> dev;
    Superblock sb;
    std::unique_ptr<MetaStore> meta;
    ASSERT_NO_FATAL_FAILURE(OpenStore(p, /*for_fsck=*/false, &dev, &sb, &meta));
    barrier_ = &meta->barrier();
    FsOptions opt;
    opt.completion = mode_;
    opt.dirsync = dirsync_;
    if (dirsync_) opt.commit_interval_s = 3600;  // no background sync stands in for the mount's own
    opt.pollers = 2;
    opt.cthreads = 2;
    opt.ring_depth = 64;
    opt.io_buffers = 24;
    Status st = Filesystem::Mount(std::move(dev), std::move(meta), sb, opt, out);
    ASSERT_TRUE(st.ok()) << st.message();
  }
  void Mount() { MountFrom(paths_, &fs_); }
  void Remount() {
    fs_.reset();
    ASSERT_NO_FATAL_FAILURE(Mount());
  }
  // Unmounts, checks the store offline as `deferfs fsck` does, mounts again.
  void RemountExpectingFsckClean() {
    fs_.reset();
    {
      std::unique_ptr<Device> dev;
      Superblock sb;
      std::unique_ptr<MetaStore> meta;
      ASSERT_NO_FATAL_FAILURE(OpenStore(paths_, /*for_fsck=*/true, &dev, &sb, &meta));
      FsckReport r;
      ASSERT_TRUE(Fsck(sb, dev->size(), meta.get(), FsckOptions{}, &r).ok());
      std::string lines;
      for (const std::string& e : r.errors) lines += "  " + e + "\n";
      EXPECT_TRUE(r.clean()) << "fsck:\n" << lines;
    }
    ASSERT_NO_FATAL_FAILURE(Mount());
  }

  Io io() { return Io(fs_.get(), mode_); }
  // Metadata commits so far, as `deferfs stats` reports them.
  uint64_t Commits() {
    const std::string json = fs_->StatsJson(false);
    const std::string key = "\"commits\":";
    const size_t at = json.find(key);
    EXPECT_NE(at, std::string::npos) << json;
    return at == std::string::npos ? 0 : std::stoull(json.substr(at + key.size()));
  }

  Inode* Create(const std::string& name) { return CreateIn(fs_.get(), name); }
  Inode* Open(const std::string& name) { return OpenIn(fs_.get(), name); }
  struct stat Stat(Inode* inode) {
    struct stat st {};
    EXPECT_TRUE(fs_->GetAttr(inode->ino, &st).ok());
    return st;
  }
  struct statvfs StatFs() {
    struct statvfs sv {};
    EXPECT_TRUE(fs_->StatFs(&sv).ok());
    return sv;
  }
  Status Truncate(Inode* inode, uint64_t size) {
    SetAttrRequest req;
    req.valid = SetAttrRequest::kSize;
    req.attr.st_size = static_cast<off_t>(size);
    struct stat st;
    return fs_->SetAttr(inode->ino, req, &st);
  }

  // Reads the whole file back in 1 MiB requests and compares it with the model.
  void ExpectContents(Inode* inode, const Model& m) {
    EXPECT_EQ(static_cast<uint64_t>(Stat(inode).st_size), m.bytes.size());
    Io x = io();
    std::vector<uint8_t> got;
    for (uint64_t off = 0; off < RoundUp(m.bytes.size()); off += kMiB) {
      uint64_t len = std::min<uint64_t>(kMiB, RoundUp(m.bytes.size()) - off);
      ssize_t res = x.Read(inode, off, len, &got);
      uint64_t want = std::min<uint64_t>(len, m.bytes.size() - off);
      ASSERT_EQ(res, static_cast<ssize_t>(want)) << "read at " << off;
      ASSERT_TRUE(SameBytes(got.data(), m.bytes.data() + off, want, off));
    }
  }

  TempDir dir_;
  FsPaths paths_;
  CompletionMode mode_ = CompletionMode::kAuto;
  bool dirsync_ = false;  // for the next mount
  DataBarrier* barrier_ = nullptr;  // the mounted store's
  std::unique_ptr<Filesystem> fs_;
};

class DioModeTest : public DioTest, public testing::WithParamInterface<CompletionMode> {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(Format(GetParam())); }
  bool defers() const { return mode_ == CompletionMode::kDefer || mode_ == CompletionMode::kAuto; }
};

}  // namespace

// Readable test names in ctest and gtest output.
void PrintTo(CompletionMode m, std::ostream* os) { *os << CompletionModeName(m); }

namespace {

// The modes that hand completions back to the issuer.
using DioDeferModeTest = DioModeTest;

std::string ModeName(const testing::TestParamInfo<CompletionMode>& info) {
  return std::string(CompletionModeName(info.param));
}

// ---------------------------------------------------------------------------
// Data: what is written reads back; nothing stale ever shows.

TEST_P(DioModeTest, AlignedWritesReadBack) {
  std::mt19937_64 rng(1234);
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  Model m;
  Io x = io();
  // Batches of up to 4 writes in flight at once, each in its own 1 MiB slot of
  // 32 (in-flight writes to the same blocks have no defined order).
  std::vector<uint64_t> slots(32);
  for (uint64_t i = 0; i < slots.size(); i++) slots[i] = i;
  for (int round = 0; round < 10; round++) {
    std::shuffle(slots.begin(), slots.end(), rng);
    std::deque<Req> reqs;
    std::vector<std::pair<uint64_t, std::vector<uint8_t>>> batch;
    for (int i = 0; i < 4; i++) {
      size_t len = kB << (rng() % 9);  // 4 KiB .. 1 MiB
      uint64_t pos = slots[i] * kMiB + (rng() % ((kMiB - len) / kB + 1)) * kB;
      batch.emplace_back(pos, RandomBytes(rng, len));
      x.StartWrite(reqs.emplace_back(), f, pos, batch.back().second.data(), len);
    }
    for (size_t i = 0; i < batch.size(); i++) {
      ASSERT_EQ(x.Wait(reqs[i]), static_cast<ssize_t>(batch[i].second.size()));
      m.Write(batch[i].first, batch[i].second);
    }
    for (auto& [pos, data] : batch) {  // each write, read back alone
      std::vector<uint8_t> got;
      ASSERT_EQ(x.Read(f, pos, data.size(), &got), static_cast<ssize_t>(data.size()));
      ASSERT_TRUE(SameBytes(got.data(), data.data(), data.size(), pos));
    }
  }
  ExpectContents(f, m);  // holes between the writes read as zeros
  fs_->Release(f);
}

TEST_P(DioModeTest, HolesUnwrittenAndEof) {
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  std::mt19937_64 rng(99);
  Model m;
  Io x = io();
  auto data = RandomBytes(rng, 8 * kB);
  ASSERT_EQ(x.Write(f, kMiB, data), static_cast<ssize_t>(data.size()));
  m.Write(kMiB, data);
  // Preallocate [2 MiB, 3 MiB): unwritten blocks that extend the file.
  ASSERT_TRUE(fs_->Fallocate(f, 0, 2 * kMiB, kMiB).ok());
  m.Truncate(3 * kMiB);
  EXPECT_EQ(Stat(f).st_blocks, static_cast<blkcnt_t>((8 * kB + kMiB) / 512));
  ExpectContents(f, m);  // the hole before 1 MiB and the unwritten MiB: zeros

  // One block written in the middle of the unwritten range converts only that
  // block; its neighbours keep reading zeros (not the device's stale bytes).
  auto blk = RandomBytes(rng, kB);
  ASSERT_EQ(x.Write(f, 2 * kMiB + 64 * kB, blk), static_cast<ssize_t>(kB));
  m.Write(2 * kMiB + 64 * kB, blk);
  // A sub-block write into unwritten and into hole blocks: the rest of the block is zeros.
  auto small = RandomBytes(rng, 100);
  ASSERT_EQ(x.Write(f, 2 * kMiB + 200 * kB + 1000, small), 100);
  m.Write(2 * kMiB + 200 * kB + 1000, small);
  ASSERT_EQ(x.Write(f, 512 * kB + 77, small), 100);
  m.Write(512 * kB + 77, small);
  ExpectContents(f, m);

  // Past EOF: nothing; across EOF: short.
  std::vector<uint8_t> got;
  EXPECT_EQ(x.Read(f, 4 * kMiB, 64 * kB, &got), 0);
  EXPECT_EQ(x.Read(f, 3 * kMiB, kB, &got), 0);
  EXPECT_EQ(x.Read(f, 3 * kMiB - kB, 64 * kB, &got), static_cast<ssize_t>(kB));
  EXPECT_EQ(x.Read(f, 3 * kMiB - 10, 100, &got), 10);  // unaligned, across EOF
  EXPECT_EQ(x.Read(f, 3 * kMiB + 5, 100, &got), 0);    // unaligned, past EOF
  // A preallocation past EOF (KEEP_SIZE) stays invisible.
  ASSERT_TRUE(fs_->Fallocate(f, FALLOC_FL_KEEP_SIZE, 3 * kMiB, kMiB).ok());
  EXPECT_EQ(static_cast<uint64_t>(Stat(f).st_size), 3 * kMiB);
  EXPECT_EQ(x.Read(f, 3 * kMiB, 64 * kB, &got), 0);
  fs_->Release(f);
}

TEST_P(DioModeTest, UnalignedReadModifyWriteMatchesModel) {
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  std::mt19937_64 rng(4321);
  Model m;
  Io x = io();
  std::vector<uint8_t> got;
  for (int i = 0; i < 150; i++) {
    // Mostly inside and around the current end, sometimes far past it (a hole).
    uint64_t span = std::max<uint64_t>(m.bytes.size() + 64 * kB, 256 * kB);
    uint64_t pos = (i % 10 == 9) ? m.bytes.size() + rng() % (2 * kMiB) : rng() % span;
    size_t len = 1 + rng() % ((i % 3 == 0) ? 64 * kB : 6000);
    if (i % 7 == 0) {  // now and then an aligned request among them
      pos &= ~(kB - 1);
      len = RoundUp(len);
    }
    auto data = RandomBytes(rng, len);
    ASSERT_EQ(x.Write(f, pos, data), static_cast<ssize_t>(len)) << "write " << i << " at " << pos;
    m.Write(pos, data);
    // The touched blocks and one on either side, read unaligned.
    uint64_t from = pos > kB ? pos - kB + 1 : 0;
    size_t rlen = std::min<uint64_t>(len + 2 * kB, 64 * kB);
    ssize_t res = x.Read(f, from, rlen, &got);
    uint64_t want = from >= m.bytes.size() ? 0 : std::min<uint64_t>(rlen, m.bytes.size() - from);
    ASSERT_EQ(res, static_cast<ssize_t>(want)) << "read " << i << " at " << from;
    ASSERT_TRUE(SameBytes(got.data(), m.bytes.data() + from, want, from)) << "after write " << i;
  }
  ExpectContents(f, m);
  fs_->Release(f);
}

// ---------------------------------------------------------------------------
// Persistence.

TEST_P(DioModeTest, FsyncedDataSurvivesRemount) {
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  std::mt19937_64 rng(777);
  Model m;
  Io x = io();
  for (int i = 0; i < 30; i++) {
    bool aligned = i % 2 == 0;
    uint64_t pos = rng() % (8 * kMiB);
    size_t len = aligned ? kB << (rng() % 7) : 1 + rng() % 20000;
    if (aligned) pos &= ~(kB - 1);
    auto data = RandomBytes(rng, len);
    ASSERT_EQ(x.Write(f, pos, data), static_cast<ssize_t>(len));
    m.Write(pos, data);
  }
  ASSERT_TRUE(fs_->Fsync(f, false).ok());
  const auto blocks = Stat(f).st_blocks;
  fs_->Release(f);
  ASSERT_NO_FATAL_FAILURE(Remount());
  f = Open("f");
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(Stat(f).st_blocks, blocks);
  ExpectContents(f, m);
  fs_->Release(f);
}

// ---------------------------------------------------------------------------
// Completion paths: the table in DESIGN.md, seen through the engine's counters.

enum class Path { kInline, kWorkqueue, kDefer, kSync };

Path WritePath(CompletionMode m, bool pure_overwrite) {
  switch (m) {
    case CompletionMode::kInline: return Path::kInline;
    case CompletionMode::kWorkqueue: return Path::kWorkqueue;
    case CompletionMode::kDefer: return Path::kDefer;
    case CompletionMode::kAuto: return pure_overwrite ? Path::kInline : Path::kDefer;
    case CompletionMode::kSync: return Path::kSync;
  }
  return Path::kSync;
}

// Checks that every request of a finished batch completed on `path` with
// `want` bytes, and that the counters moved by exactly that.
void ExpectCompletedOn(Path path, std::deque<Req>& reqs, const Counts& d, ssize_t want) {
  const auto me = std::this_thread::get_id();
  int64_t queued = 0;
  for (Req& r : reqs) {
    EXPECT_EQ(r.queued() ? r.res : r.started, want);
    if (!r.queued()) continue;  // finished in the submitter: counted inline (or sync)
    queued++;
    EXPECT_EQ(r.parked.load(), path == Path::kDefer) << "dio_complete handed to the issuer";
    if (path == Path::kDefer) {
      EXPECT_TRUE(r.parked_private) << "dio_complete set without private_data";
      EXPECT_EQ(r.completer, me) << "a deferred completion must finish in the issuer";
    } else {
      EXPECT_NE(r.completer, me) << "a queued completion ran in the issuer";
    }
  }
  // A request whose IO was all done before submission returned was finished
  // by the submitter (as in the kernel): counted at_submit, not on `path`.
  const int64_t n = static_cast<int64_t>(reqs.size());
  const Counts want_d{path == Path::kInline ? queued : 0, path == Path::kDefer ? queued : 0,
                      path == Path::kWorkqueue ? queued : 0, path == Path::kSync ? n : 0,
                      path == Path::kSync ? 0 : n - queued, d.pure, 0};
  EXPECT_TRUE(path != Path::kSync || queued == 0) << "a synchronous kiocb went async";
  EXPECT_EQ(d.inl, want_d.inl);
  EXPECT_EQ(d.deferred, want_d.deferred);
  EXPECT_EQ(d.wq, want_d.wq);
  EXPECT_EQ(d.sync, want_d.sync);
  EXPECT_EQ(d.at_submit, want_d.at_submit);
  EXPECT_EQ(d.errors, 0);
}

TEST_P(DioModeTest, CompletionPathsFollowTheTable) {
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  std::mt19937_64 rng(5);
  Io x = io();
  constexpr int kN = 8;
  constexpr size_t kLen = 64 * kB;
  auto data = RandomBytes(rng, kLen);
  // Runs kN requests at once (block i*kLen), all waited; returns the counter delta.
  auto batch = [&](bool write, uint32_t flags, std::deque<Req>* reqs) {
    Counts before = Snap(fs_->engine());
    for (int i = 0; i < kN; i++) {
      Req& r = reqs->emplace_back();
      if (write) x.StartWrite(r, f, i * kLen, data.data(), kLen, flags);
      else x.StartRead(r, f, i * kLen, kLen);
    }
    for (Req& r : *reqs) x.Wait(r);
    return Snap(fs_->engine()) - before;
  };

  {
    SCOPED_TRACE("allocating writes");
    std::deque<Req> reqs;
    Counts d = batch(true, IOCB_DIO_DEFER, &reqs);
    ExpectCompletedOn(WritePath(mode_, false), reqs, d, kLen);
    EXPECT_EQ(d.pure, 0);
  }
  EXPECT_EQ(static_cast<uint64_t>(Stat(f).st_size), kN * kLen);
  {
    SCOPED_TRACE("pure overwrites");
    std::deque<Req> reqs;
    Counts d = batch(true, IOCB_DIO_DEFER, &reqs);
    ExpectCompletedOn(WritePath(mode_, true), reqs, d, kLen);
    EXPECT_EQ(d.pure, kN);
  }
  {
    SCOPED_TRACE("reads");
    std::deque<Req> reqs;
    Counts d = batch(false, IOCB_DIO_DEFER, &reqs);
    ExpectCompletedOn(mode_ == CompletionMode::kSync ? Path::kSync : Path::kInline, reqs, d, kLen);
    for (Req& r : reqs) ASSERT_TRUE(SameBytes(r.buf->base, data.data(), kLen, r.iocb.pos));
  }
  {
    // The seed's contract: no IOCB_DIO_DEFER, no dio_complete. What would
    // have been deferred goes to the workqueue.
    SCOPED_TRACE("allocating writes without IOCB_DIO_DEFER");
    ASSERT_TRUE(Truncate(f, 0).ok());
    std::deque<Req> reqs;
    Counts d = batch(true, 0, &reqs);
    Path p = WritePath(mode_, false);
    ExpectCompletedOn(p == Path::kDefer ? Path::kWorkqueue : p, reqs, d, kLen);
  }
  fs_->Release(f);
}

// The issuer side of the seed in detail: a deferred completion does none of
// its work until the issuer runs it, and the result comes from dio_complete.
TEST_P(DioDeferModeTest, DeferredCompletionWaitsForTheIssuer) {
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  std::mt19937_64 rng(6);
  Io x = io();
  constexpr int kN = 6;
  constexpr size_t kLen = 16 * kB;
  auto data = RandomBytes(rng, kLen);
  TaskWork* me = TaskWork::Current();
  const uint64_t ran_before = me->stats().deferred_run.load();
  std::deque<Req> reqs;
  for (int i = 0; i < kN; i++) x.StartWrite(reqs.emplace_back(), f, i * kLen, data.data(), kLen);
  int queued = 0;
  for (Req& r : reqs) queued += r.queued();
  ASSERT_TRUE(SpinUntil([&] {
    for (Req& r : reqs) if (r.queued() && !r.parked.load(std::memory_order_acquire)) return false;
    return true;
  })) << "a deferred completion never came back to the issuer";
  if (queued > 0) {
    // Handed back, not yet run: no request is done, the DIOs still count as
    // in flight, and nothing of the completion work (the new size) happened.
    for (Req& r : reqs) {
      if (r.queued()) {
        EXPECT_FALSE(r.done.load());
        EXPECT_TRUE(r.parked_private);
      }
    }
    EXPECT_TRUE(me->has_pending());
    EXPECT_EQ(f->dio_count.load(), queued);
    EXPECT_LT(static_cast<uint64_t>(Stat(f).st_size), kN * kLen);
  }
  EXPECT_EQ(me->RunPending(), static_cast<size_t>(queued));
  EXPECT_EQ(me->stats().deferred_run.load() - ran_before, static_cast<uint64_t>(queued));
  for (Req& r : reqs) {
    if (!r.queued()) continue;
    EXPECT_TRUE(r.done.load());
    EXPECT_EQ(r.final_calls, 1);
    EXPECT_EQ(r.res, static_cast<ssize_t>(kLen)) << "the result must be dio_complete's, not ki_complete's first res";
  }
  EXPECT_EQ(f->dio_count.load(), 0);
  EXPECT_EQ(static_cast<uint64_t>(Stat(f).st_size), kN * kLen);
  fs_->Release(f);
}

// Deferred completions run back to back share their end work: allocating
// writes to one inode make one metadata commit, each request still gets its
// own result, and what the shared commit recorded survives a remount.
// O_DSYNC writes are never held back for a batch: they commit (synced) alone.
TEST_P(DioDeferModeTest, DeferredWritesShareOneCommitPerInode) {
  Inode* files[2] = {Create("f"), Create("g")};
  ASSERT_NE(files[0], nullptr);
  ASSERT_NE(files[1], nullptr);
  Model models[2];
  {
    // The requests (and their buffers, from this mount's pool) end before the remount.
    std::mt19937_64 rng(16);
    Io x = io();
    constexpr int kN = 12;  // writes per file, to interleaved blocks
    constexpr size_t kLen = 8 * kB;
    std::deque<Req> reqs;
    std::vector<std::vector<uint8_t>> datas;
    for (int i = 0; i < kN; i++) {
      for (int f = 0; f < 2; f++) {
        datas.push_back(RandomBytes(rng, kLen));
        // Every other block, backwards: each write splits the file's extents.
        const uint64_t pos = (kN - 1 - i) * 2 * kLen;
        // The last write to g is O_DSYNC.
        const uint32_t flags = f == 1 && i == kN - 1 ? uint32_t{IOCB_DIO_DEFER | IOCB_DSYNC} : uint32_t{IOCB_DIO_DEFER};
        x.StartWrite(reqs.emplace_back(), files[f], pos, datas.back().data(), kLen, flags);
        models[f].Write(pos, datas.back());
      }
    }
    ASSERT_TRUE(SpinUntil([&] {
      for (Req& r : reqs) if (r.queued() && !r.parked.load(std::memory_order_acquire)) return false;
      return true;
    })) << "a deferred completion never came back to the issuer";
    int queued[2] = {0, 0};
    bool dsync_queued = false;
    for (size_t i = 0; i < reqs.size(); i++) {
      if (!reqs[i].queued()) continue;
      const bool dsync = reqs[i].iocb.ki_flags & IOCB_DSYNC;
      dsync_queued |= dsync;
      if (!dsync) queued[i % 2]++;
    }
    // Requests whose IO was done before submission returned finished there, alone.
    const uint64_t commits_before = Commits();
    EXPECT_EQ(TaskWork::Current()->RunPending(), static_cast<size_t>(queued[0] + queued[1] + dsync_queued));
    const uint64_t want = (queued[0] > 0) + (queued[1] > 0) + dsync_queued;
    EXPECT_EQ(Commits() - commits_before, want) << queued[0] << " and " << queued[1] << " batched writes";
    for (Req& r : reqs) {
      ASSERT_EQ(x.Wait(r), static_cast<ssize_t>(kLen));
      EXPECT_EQ(r.final_calls, r.queued() ? 1 : 0);
    }
  }
  for (Inode* f : files) fs_->Release(f);

  ASSERT_NO_FATAL_FAILURE(Remount());
  Inode* again[2] = {Open("f"), Open("g")};
  for (int f = 0; f < 2; f++) {
    ASSERT_NE(again[f], nullptr);
    ExpectContents(again[f], models[f]);
    fs_->Release(again[f]);
  }
}

// ---------------------------------------------------------------------------
// The 6.6-rc8 self-deadlock: the issuer has async writes whose completions
// are queued to its own task_work, then does something that must drain the
// inode's DIO. It must run those completions itself instead of sleeping.

TEST_P(DioModeTest, DrainsFromTheIssuerDoNotSelfDeadlock) {
  Watchdog dog("a drain with the issuer's own completions queued");
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  std::mt19937_64 rng(8);
  Io x = io();
  Model m;
  constexpr int kN = 8;
  constexpr size_t kLen = 32 * kB;

  // Issues kN allocating writes at base.. and waits until their completions
  // are parked on this thread (defer/auto) or at least issued (other modes).
  auto issue = [&](uint64_t base, std::deque<Req>* reqs, std::vector<std::vector<uint8_t>>* datas) {
    for (int i = 0; i < kN; i++) {
      datas->push_back(RandomBytes(rng, kLen));
      x.StartWrite(reqs->emplace_back(), f, base + i * kLen, datas->back().data(), kLen);
    }
    if (!defers()) return;
    int queued = 0;
    for (Req& r : *reqs) queued += r.queued();
    ASSERT_TRUE(SpinUntil([&] {
      for (Req& r : *reqs) if (r.queued() && !r.parked.load(std::memory_order_acquire)) return false;
      return true;
    }));
    // The kernel's hang needs exactly this: in-flight DIO that only we can finish.
    EXPECT_EQ(f->dio_count.load(), queued);
  };
  auto finish = [&](uint64_t base, std::deque<Req>& reqs, std::vector<std::vector<uint8_t>>& datas) {
    for (int i = 0; i < kN; i++) {
      if (defers() && reqs[i].queued()) {
        EXPECT_TRUE(reqs[i].done.load()) << "the drain returned before completion " << i;
      }
      ASSERT_EQ(x.Wait(reqs[i]), static_cast<ssize_t>(kLen));
      m.Write(base + i * kLen, datas[i]);
    }
  };

  {
    SCOPED_TRACE("fallocate punch");
    std::deque<Req> reqs;
    std::vector<std::vector<uint8_t>> datas;
    ASSERT_NO_FATAL_FAILURE(issue(0, &reqs, &datas));
    Status st = fs_->Fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 3 * kB, 40 * kB);
    EXPECT_TRUE(st.ok()) << st.message();
    ASSERT_NO_FATAL_FAILURE(finish(0, reqs, datas));
    m.Zero(3 * kB, 40 * kB);  // the drain ordered every write before the punch
  }
  {
    SCOPED_TRACE("truncate");
    std::deque<Req> reqs;
    std::vector<std::vector<uint8_t>> datas;
    const uint64_t base = kN * kLen;
    ASSERT_NO_FATAL_FAILURE(issue(base, &reqs, &datas));
    const uint64_t size = base + 3 * kLen + 1234;
    Status st = Truncate(f, size);
    EXPECT_TRUE(st.ok()) << st.message();
    ASSERT_NO_FATAL_FAILURE(finish(base, reqs, datas));
    m.Truncate(size);
  }
  {
    SCOPED_TRACE("unaligned write");
    std::deque<Req> reqs;
    std::vector<std::vector<uint8_t>> datas;
    const uint64_t base = 2 * kN * kLen;
    ASSERT_NO_FATAL_FAILURE(issue(base, &reqs, &datas));
    auto small = RandomBytes(rng, 333);
    Req u;
    x.StartWrite(u, f, base + kLen + 17, small.data(), small.size());
    EXPECT_EQ(u.started, static_cast<ssize_t>(small.size())) << "an unaligned write is synchronous";
    ASSERT_NO_FATAL_FAILURE(finish(base, reqs, datas));
    m.Write(base + kLen + 17, small);
  }
  ExpectContents(f, m);
  fs_->Release(f);
}

INSTANTIATE_TEST_SUITE_P(DioModes, DioModeTest,
                         testing::Values(CompletionMode::kInline, CompletionMode::kWorkqueue, CompletionMode::kDefer,
                                         CompletionMode::kAuto, CompletionMode::kSync),
                         ModeName);
INSTANTIATE_TEST_SUITE_P(DioModes, DioDeferModeTest, testing::Values(CompletionMode::kDefer, CompletionMode::kAuto),
                         ModeName);

// ---------------------------------------------------------------------------
// A crash before completion loses the write, never exposes its blocks.

TEST_F(DioTest, AllocationIsCommittedOnlyAtCompletion) {
  ASSERT_NO_FATAL_FAILURE(Format(CompletionMode::kDefer));
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  ASSERT_TRUE(fs_->Fsync(f, false).ok());
  const auto free_before = StatFs().f_bfree;
  std::mt19937_64 rng(10);
  auto data = RandomBytes(rng, 256 * kB);
  Io x = io();
  auto r = std::make_unique<Req>();  // gone (its buffer back in the pool) before the remount
  x.StartWrite(*r, f, 0, data.data(), data.size());
  if (!r->queued()) GTEST_SKIP() << "the write finished during submission; nothing was in flight";
  ASSERT_TRUE(SpinUntil([&] { return r->parked.load(std::memory_order_acquire); }));

  // The data is on the device, its completion parked here: copy the backing
  // and the metadata store now, as a power cut (with the page cache intact) would.
  const FsPaths snap{dir_.path() + "/crash-backing", dir_.path() + "/crash-meta"};
  std::filesystem::copy_file(paths_.backing, snap.backing);
  std::filesystem::copy(paths_.meta, snap.meta, std::filesystem::copy_options::recursive);
  {
    std::unique_ptr<Filesystem> crashed;
    ASSERT_NO_FATAL_FAILURE(MountFrom(snap, &crashed));
    Inode* cf = OpenIn(crashed.get(), "f");
    ASSERT_NE(cf, nullptr);
    struct stat st;
    ASSERT_TRUE(crashed->GetAttr(cf->ino, &st).ok());
    EXPECT_EQ(st.st_size, 0) << "the size was committed before the write completed";
    EXPECT_EQ(st.st_blocks, 0) << "extents were committed before the write completed";
    struct statvfs sv;
    ASSERT_TRUE(crashed->StatFs(&sv).ok());
    EXPECT_EQ(sv.f_bfree, free_before) << "the in-flight allocation must come back after a crash";
    crashed->Release(cf);
  }

  EXPECT_EQ(x.Wait(*r), static_cast<ssize_t>(data.size()));
  r.reset();
  ASSERT_TRUE(fs_->Fsync(f, false).ok());
  fs_->Release(f);
  ASSERT_NO_FATAL_FAILURE(Remount());
  f = Open("f");
  ASSERT_NE(f, nullptr);
  Model m;
  m.Write(0, data);
  ExpectContents(f, m);
  EXPECT_EQ(StatFs().f_bfree, free_before - data.size() / kB);
  fs_->Release(f);
}

// The report carries each latency path's histogram for `stats --watch`;
// one that does not fit the caller's buffer is left out, not the report.
TEST_F(DioTest, StatsReportDropsHistogramsThatDoNotFit) {
  ASSERT_NO_FATAL_FAILURE(Format(CompletionMode::kDefer));
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  std::mt19937_64 rng(11);
  auto data = RandomBytes(rng, 64 * kB);
  Io x = io();
  for (int i = 0; i < 8; i++) ASSERT_EQ(x.Write(f, i * data.size(), data), static_cast<ssize_t>(data.size()));
  fs_->Release(f);
  auto count = [](const std::string& s, const std::string& what) {
    size_t n = 0;
    for (size_t at = 0; (at = s.find(what, at)) != std::string::npos; at++) n++;
    return n;
  };
  auto head = [](const std::string& s) { return s.substr(0, s.find("\"latency\"")); };

  const std::string full = fs_->StatsJson(false);
  const size_t at = full.find("\"write_device\":{\"count\":8,");
  ASSERT_NE(at, std::string::npos) << full;
  EXPECT_NE(full.find("\"histogram\":[[", at), std::string::npos) << full;
  EXPECT_NE(full.find("\"histogram\":[]"), std::string::npos) << "reads: an empty histogram\n" << full;
  EXPECT_EQ(count(full, "histogram"), 4u) << full;
  EXPECT_EQ(fs_->StatsJson(false, full.size() + 1), full) << "it fits exactly, with its NUL";

  const std::string cut = fs_->StatsJson(false, full.size());  // one byte short
  EXPECT_LT(cut.size() + 1, full.size());
  EXPECT_LT(count(cut, "histogram"), 4u) << cut;
  EXPECT_NE(cut.find("\"write_device\":{\"count\":8,"), std::string::npos) << cut;
  EXPECT_TRUE(cut.ends_with("}}}")) << cut;
  EXPECT_EQ(head(full), head(cut)) << "only histograms may go";

  std::string none = full;  // the report without any histogram
  for (size_t from; (from = none.find(",\"histogram\":[")) != std::string::npos;) {
    none.erase(from, none.find("]}", from) + 1 - from);
  }
  EXPECT_EQ(fs_->StatsJson(false, none.size() + 1), none) << "room for the summaries only";
}

// ---------------------------------------------------------------------------
// Truncate and fallocate at the edges ext4 defines.

int64_t Ns(const timespec& ts) { return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec; }

// Every truncate is a change, to the same size too (open O_TRUNC of an empty
// file, ftruncate): the kernel leaves their mtime to the server.
TEST_F(DioTest, TruncateToTheSameSizeUpdatesMtime) {
  ASSERT_NO_FATAL_FAILURE(Format(CompletionMode::kAuto));
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  const timespec past{1'000'000'000, 5};
  auto set_times = [&](uint32_t valid, uint64_t size) {
    SetAttrRequest req;
    req.valid = valid | SetAttrRequest::kMtime;
    req.attr.st_size = static_cast<off_t>(size);
    req.attr.st_mtim = past;
    struct stat st;
    return fs_->SetAttr(f->ino, req, &st);
  };
  for (uint64_t size : {uint64_t{0}, uint64_t{3}, uint64_t{2 * kB}}) {
    SCOPED_TRACE(size);
    ASSERT_TRUE(Truncate(f, size).ok());
    ASSERT_TRUE(set_times(0, size).ok());
    ASSERT_TRUE(Truncate(f, size).ok());
    const struct stat st = Stat(f);
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), size);
    EXPECT_GT(Ns(st.st_mtim), Ns(past)) << "mtime did not move";
    EXPECT_GT(Ns(st.st_ctim), Ns(past));
  }
  // An explicit mtime in the same request wins.
  ASSERT_TRUE(set_times(SetAttrRequest::kSize, 2 * kB).ok());
  EXPECT_EQ(Ns(Stat(f).st_mtim), Ns(past));
  ASSERT_TRUE(Truncate(f, 2 * kB).ok());
  const int64_t mtime = Ns(Stat(f).st_mtim);
  EXPECT_GT(mtime, Ns(past));
  fs_->Release(f);
  ASSERT_NO_FATAL_FAILURE(Remount());
  f = Open("f");
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(Ns(Stat(f).st_mtim), mtime) << "not persisted";
  fs_->Release(f);
}

// On a dirsync mount a create is durable when it returns, but its WAL sync
// runs after the namespace lock is dropped: a lookup does not wait for it.
TEST_F(DioTest, DirsyncCreatesSyncWithoutHoldingTheNamespace) {
  dirsync_ = true;
  ASSERT_NO_FATAL_FAILURE(Format(CompletionMode::kAuto));
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  fs_->Release(f);
  // The device flush before the next WAL sync (a create's commit arms it)
  // blocks until released.
  struct Gate {
    std::mutex mu;
    std::condition_variable cv;
    bool entered = false, released = false;
  };
  auto gate = std::make_shared<Gate>();
  barrier_->SetFlush([gate] {
    std::unique_lock l(gate->mu);
    gate->entered = true;
    gate->cv.notify_all();
    gate->cv.wait(l, [&] { return gate->released; });
    return Status::Ok();
  });
  auto release = [&] {
    std::lock_guard l(gate->mu);
    gate->released = true;
    gate->cv.notify_all();
  };
  Status made;
  std::atomic<bool> mkdir_returned{false};
  std::thread mkdir([&] {
    struct stat st;
    made = fs_->Mkdir(Caller{0, 0, 022, nullptr}, kRootIno, "d", 0755, &st);
    mkdir_returned = true;
  });
  {
    std::unique_lock l(gate->mu);
    EXPECT_TRUE(gate->cv.wait_for(l, 60s, [&] { return gate->entered; })) << "the mkdir never synced";
  }
  std::atomic<bool> looked_up{false};
  std::thread lookup([&] {
    struct stat st;
    EXPECT_TRUE(fs_->Lookup(kRootIno, "f", &st).ok());
    looked_up = true;
  });
  // Generous: a lookup takes microseconds; it would wait here for good
  // (until the release below) if the sync held the namespace lock.
  for (int i = 0; i < 3000 && !looked_up; i++) std::this_thread::sleep_for(10ms);
  EXPECT_TRUE(looked_up) << "a lookup waited for another directory change's WAL sync";
  EXPECT_FALSE(mkdir_returned) << "the mkdir returned before its sync";
  release();
  lookup.join();
  mkdir.join();
  EXPECT_TRUE(made.ok()) << made.message();
  struct stat st;
  EXPECT_TRUE(fs_->Lookup(kRootIno, "d", &st).ok());
}

// A truncate with other attributes in one SETATTR (the kernel sends a
// setuid file's truncate with the mode that clears S_ISUID) changes them
// together, in one commit: a crash cannot keep the new size with the
// setuid bit.
TEST_F(DioTest, TruncateWithOtherAttributesIsOneCommit) {
  ASSERT_NO_FATAL_FAILURE(Format(CompletionMode::kAuto));
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  SetAttrRequest req;
  req.valid = SetAttrRequest::kMode;
  req.attr.st_mode = S_ISUID | 0755;
  struct stat st;
  ASSERT_TRUE(fs_->SetAttr(f->ino, req, &st).ok());
  req.valid = SetAttrRequest::kSize | SetAttrRequest::kMode;
  req.attr.st_size = 3 * kB;
  req.attr.st_mode = 0755;
  const uint64_t before = Commits();
  ASSERT_TRUE(fs_->SetAttr(f->ino, req, &st).ok());
  EXPECT_EQ(Commits(), before + 1);
  EXPECT_EQ(st.st_size, 3 * kB);
  EXPECT_EQ(st.st_mode & 07777, 0755u);
  EXPECT_EQ(Ns(st.st_ctim), Ns(st.st_mtim)) << "one change, one time";
  fs_->Release(f);
  ASSERT_NO_FATAL_FAILURE(Remount());
  f = Open("f");
  ASSERT_NE(f, nullptr);
  st = Stat(f);
  EXPECT_EQ(st.st_size, 3 * kB);
  EXPECT_EQ(st.st_mode & 07777, 0755u);
  fs_->Release(f);
}

// Blocks preallocated past EOF (KEEP_SIZE) go with any truncate that does not
// grow the file, to the same size too (as ext4); the block holding EOF stays.
TEST_F(DioTest, TruncateFreesBlocksPreallocatedPastEof) {
  ASSERT_NO_FATAL_FAILURE(Format(CompletionMode::kAuto));
  const uint64_t free0 = StatFs().f_bfree;
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  Io x = io();
  const std::vector<uint8_t> hello{'h', 'e', 'l', 'l', 'o'};
  ASSERT_EQ(x.Write(f, 0, hello), 5);
  Model m;
  m.Write(0, hello);
  ASSERT_TRUE(fs_->Fallocate(f, FALLOC_FL_KEEP_SIZE, 0, 8 * kMiB).ok());
  EXPECT_EQ(Stat(f).st_blocks, static_cast<blkcnt_t>(8 * kMiB / 512));

  ASSERT_TRUE(Truncate(f, 5).ok());
  EXPECT_EQ(Stat(f).st_blocks, static_cast<blkcnt_t>(kB / 512)) << "the preallocation past EOF stayed";
  EXPECT_EQ(StatFs().f_bfree, free0 - 1);
  ExpectContents(f, m);

  // Growing keeps a preallocation past the new EOF; the same size again,
  // block-aligned, frees it.
  ASSERT_TRUE(fs_->Fallocate(f, FALLOC_FL_KEEP_SIZE, kMiB, 8 * kMiB).ok());
  ASSERT_TRUE(Truncate(f, 2 * kB).ok());
  EXPECT_EQ(Stat(f).st_blocks, static_cast<blkcnt_t>((kB + 8 * kMiB) / 512));
  ASSERT_TRUE(Truncate(f, 2 * kB).ok());
  EXPECT_EQ(Stat(f).st_blocks, static_cast<blkcnt_t>(kB / 512));
  m.Truncate(2 * kB);
  ExpectContents(f, m);
  fs_->Release(f);

  ASSERT_NO_FATAL_FAILURE(RemountExpectingFsckClean());
  EXPECT_EQ(StatFs().f_bfree, free0 - 1);
  f = Open("f");
  ASSERT_NE(f, nullptr);
  ExpectContents(f, m);
  fs_->Release(f);
}

// A fallocate that runs out of space leaves the file as it was: no block of
// its own kept, the size, times and older blocks untouched, the space free.
TEST_F(DioTest, FallocateEnospcLeavesTheFileAsItWas) {
  ASSERT_NO_FATAL_FAILURE(Format(CompletionMode::kAuto, 20 * kMiB));
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  std::mt19937_64 rng(8);
  const auto data = RandomBytes(rng, 64 * kB);
  ASSERT_EQ(io().Write(f, 0, data), static_cast<ssize_t>(data.size()));
  ASSERT_TRUE(fs_->Fallocate(f, FALLOC_FL_KEEP_SIZE, kMiB, kMiB).ok());
  Model m;
  m.Write(0, data);
  const struct stat before = Stat(f);
  const uint64_t free_before = StatFs().f_bfree;
  ASSERT_GT(free_before, 0u);
  ASSERT_LT(free_before * kB, 100 * kMiB);

  auto expect_unchanged = [&](const char* what) {
    SCOPED_TRACE(what);
    const struct stat st = Stat(f);
    EXPECT_EQ(st.st_size, before.st_size);
    EXPECT_EQ(st.st_blocks, before.st_blocks) << "blocks kept";
    EXPECT_EQ(Ns(st.st_mtim), Ns(before.st_mtim));
    EXPECT_EQ(Ns(st.st_ctim), Ns(before.st_ctim));
    EXPECT_EQ(StatFs().f_bfree, free_before) << "space not given back";
    ExpectContents(f, m);
  };
  EXPECT_EQ(fs_->Fallocate(f, 0, 0, 100 * kMiB).err(), ENOSPC);
  expect_unchanged("mode 0");
  EXPECT_EQ(fs_->Fallocate(f, FALLOC_FL_KEEP_SIZE, 4 * kMiB, 100 * kMiB).err(), ENOSPC);
  expect_unchanged("keep size");
  EXPECT_EQ(fs_->Fallocate(f, FALLOC_FL_ZERO_RANGE, 100, 100 * kMiB).err(), ENOSPC);
  expect_unchanged("zero range");

  // All of it is free: a fallocate of exactly that much fits.
  ASSERT_TRUE(fs_->Fallocate(f, 0, 2 * kMiB, free_before * kB).ok());
  EXPECT_EQ(StatFs().f_bfree, 0u);
  m.Truncate(2 * kMiB + free_before * kB);
  fs_->Release(f);
  ASSERT_NO_FATAL_FAILURE(RemountExpectingFsckClean());
  EXPECT_EQ(StatFs().f_bfree, 0u);
  f = Open("f");
  ASSERT_NE(f, nullptr);
  ExpectContents(f, m);
  // A zero range inside one block needs no block: it zeroes in place, full
  // device or not.
  ASSERT_TRUE(fs_->Fallocate(f, FALLOC_FL_ZERO_RANGE, 100, 200).ok());
  m.Zero(100, 200);
  ExpectContents(f, m);
  // Nor does one over blocks the file has (written, and fallocated past
  // them): they turn unwritten in place, as on ext4.
  const uint64_t blocks = Stat(f).st_blocks;
  for (const auto& [off, len] : {std::pair{6 * kB, 58 * kB}, std::pair{kMiB + 100, 3 * kMiB / 2}}) {
    ASSERT_TRUE(fs_->Fallocate(f, FALLOC_FL_ZERO_RANGE, off, len).ok()) << off;
    m.Zero(off, len);
  }
  EXPECT_EQ(StatFs().f_bfree, 0u);
  EXPECT_EQ(Stat(f).st_blocks, blocks);
  ExpectContents(f, m);
  fs_->Release(f);
  ASSERT_NO_FATAL_FAILURE(RemountExpectingFsckClean());
  f = Open("f");
  ASSERT_NE(f, nullptr);
  ExpectContents(f, m);
  EXPECT_EQ(Stat(f).st_blocks, blocks);
  fs_->Release(f);
}

// ---------------------------------------------------------------------------
// ENOSPC: a full device fails writes cleanly and recovers when space is freed.

class DioEnospcTest : public DioModeTest {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(Format(GetParam(), 20 * kMiB)); }

  // Appends to `f` (1 MiB, then 4 KiB requests) until the device is full;
  // returns the file size reached. Every block is then in use.
  uint64_t Fill(Inode* f, uint64_t from) {
    Io x = io();
    std::vector<uint8_t> data(kMiB, 0x3C);
    uint64_t pos = from;
    for (size_t len : {kMiB, size_t{kB}}) {
      for (int i = 0; i < 6000; i++) {
        ssize_t res = x.Write(f, pos, data.data(), len);
        if (res == -ENOSPC) break;
        EXPECT_EQ(res, static_cast<ssize_t>(len)) << "at " << pos;
        if (res != static_cast<ssize_t>(len)) return pos;
        pos += len;
      }
    }
    return pos;
  }
};

TEST_P(DioEnospcTest, FullDeviceStaysUsable) {
  Inode* a = Create("a");
  Inode* b = Create("b");
  ASSERT_TRUE(a && b);
  const auto total = StatFs().f_blocks;
  EXPECT_EQ(StatFs().f_bfree, total);
  const uint64_t size = Fill(a, 0);
  ASSERT_FALSE(HasFailure());
  EXPECT_EQ(StatFs().f_bfree, 0u);
  EXPECT_EQ(static_cast<uint64_t>(Stat(a).st_size), size);
  EXPECT_EQ(static_cast<uint64_t>(Stat(a).st_blocks) / (kB / 512), total) << "every block belongs to a";

  Io x = io();
  std::vector<uint8_t> one(kB, 0x11);
  EXPECT_EQ(x.Write(b, 0, one), -ENOSPC);
  EXPECT_EQ(x.Write(b, 10, one.data(), 100), -ENOSPC);
  EXPECT_EQ(fs_->Fallocate(b, 0, 0, kMiB).err(), ENOSPC);
  EXPECT_EQ(Stat(b).st_size, 0) << "a failed write must not change the size";

  // Punch a hole: the space is free once the punch is durable.
  ASSERT_TRUE(fs_->Fallocate(a, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kMiB).ok());
  EXPECT_EQ(StatFs().f_bfree, kMiB / kB);
  ASSERT_TRUE(fs_->Sync().ok());
  std::mt19937_64 rng(12);
  auto data = RandomBytes(rng, kMiB);
  EXPECT_EQ(x.Write(b, 0, data), static_cast<ssize_t>(kMiB));
  EXPECT_EQ(StatFs().f_bfree, 0u);

  // Unlink: all of a comes back.
  fs_->Release(a);
  ASSERT_NO_FATAL_FAILURE(UnlinkIn(fs_.get(), "a"));
  EXPECT_EQ(StatFs().f_bfree, total - kMiB / kB);
  ASSERT_TRUE(fs_->Sync().ok());
  Model m;
  m.Write(0, data);
  for (uint64_t off = kMiB; off < 5 * kMiB; off += kMiB) {
    auto more = RandomBytes(rng, kMiB);
    ASSERT_EQ(x.Write(b, off, more), static_cast<ssize_t>(kMiB));
    m.Write(off, more);
  }
  ExpectContents(b, m);
  ASSERT_TRUE(fs_->Fsync(b, false).ok());
  const auto free_now = StatFs().f_bfree;
  EXPECT_EQ(free_now, total - 5 * kMiB / kB);
  fs_->Release(b);

  // The free count is the complement of the extents: a remount agrees.
  ASSERT_NO_FATAL_FAILURE(Remount());
  EXPECT_EQ(StatFs().f_bfree, free_now);
  b = Open("b");
  ASSERT_NE(b, nullptr);
  ExpectContents(b, m);
  fs_->Release(b);
}

INSTANTIATE_TEST_SUITE_P(DioModes, DioEnospcTest,
                         testing::Values(CompletionMode::kInline, CompletionMode::kWorkqueue, CompletionMode::kDefer,
                                         CompletionMode::kAuto, CompletionMode::kSync),
                         ModeName);

// A write that fails with ENOSPC must give back only its own allocations.
// Here it covers (but never reached) blocks that another, still in-flight
// write allocated: that write must still land and keep its blocks.
TEST_F(DioTest, EnospcWriteDoesNotFreeAnotherWritesAllocation) {
  ASSERT_NO_FATAL_FAILURE(Format(CompletionMode::kDefer, 20 * kMiB));
  Inode* a = Create("a");
  Inode* f = Create("f");
  ASSERT_TRUE(a && f);
  Io x = io();
  std::vector<uint8_t> fill(kMiB, 0x3C);
  uint64_t pos = 0;
  for (size_t len : {kMiB, size_t{kB}}) {
    for (ssize_t res = 0; (res = x.Write(a, pos, fill.data(), len)) != -ENOSPC; pos += len) ASSERT_EQ(res, static_cast<ssize_t>(len));
  }
  ASSERT_EQ(StatFs().f_bfree, 0u);
  // Exactly one free block.
  ASSERT_TRUE(fs_->Fallocate(a, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kB).ok());
  ASSERT_TRUE(fs_->Sync().ok());

  // C takes it for block 10 of f; its completion stays parked here.
  std::vector<uint8_t> cdata(kB, 0xC3);
  Req c;
  x.StartWrite(c, f, 10 * kB, cdata.data(), kB);
  if (!c.queued()) GTEST_SKIP() << "C finished during submission; nothing was in flight";
  ASSERT_TRUE(SpinUntil([&] { return c.parked.load(std::memory_order_acquire); }));
  EXPECT_EQ(StatFs().f_bfree, 0u);

  // B covers blocks 0..15 and fails at its first allocation.
  std::vector<uint8_t> bdata(16 * kB, 0xB2);
  EXPECT_EQ(x.Write(f, 0, bdata), -ENOSPC);
  EXPECT_EQ(StatFs().f_bfree, 0u) << "B's failure freed C's in-flight block";

  EXPECT_EQ(x.Wait(c), static_cast<ssize_t>(kB));
  EXPECT_EQ(static_cast<uint64_t>(Stat(f).st_size), 11 * kB);
  EXPECT_EQ(Stat(f).st_blocks, static_cast<blkcnt_t>(kB / 512)) << "C's block is not mapped";
  std::vector<uint8_t> got;
  ASSERT_EQ(x.Read(f, 10 * kB, kB, &got), static_cast<ssize_t>(kB));
  EXPECT_TRUE(SameBytes(got.data(), cdata.data(), kB, 10 * kB)) << "C reported success but its data is gone";
  fs_->Release(a);
  fs_->Release(f);
}

}  // namespace
}  // namespace deferfs
