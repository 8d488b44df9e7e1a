// Injected device faults (backend/fault_inject.h) and a full device, against
// a real O_DIRECT backing file: first the poller alone, then the dio engine
// through Filesystem's data path in every completion mode. The test thread
// plays the FUSE worker and waits only through TaskWork::WaitUntil.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "backend/device.h"
#include "backend/fault_inject.h"
#include "backend/metadata.h"
#include "backend/poller.h"
#include "backend/superblock.h"
#include "fs/filesystem.h"
#include "tests/unit/fs_files.h"
#include "tests/unit/temp_dir.h"

namespace deferfs {
namespace {

constexpr uint64_t kB = kBlockSize;
constexpr uint64_t kMiB = 1 << 20;
// Every block of a backing starts as this byte: a block mapped without its
// data having been written would show it.
constexpr uint8_t kStale = 0xA5;

// A backing file of `bytes`, every byte kStale.
void MakeBacking(const std::string& path, uint64_t bytes) {
  UniqueFd fd(open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  ASSERT_TRUE(fd.valid()) << path << ": " << strerror(errno);
  std::vector<uint8_t> chunk(kMiB, kStale);
  for (uint64_t off = 0; off < bytes; off += kMiB) {
    ASSERT_EQ(pwrite(fd.get(), chunk.data(), kMiB, static_cast<off_t>(off)), static_cast<ssize_t>(kMiB));
  }
}

// Puts `tag` at the start of the 4 KiB block at `p`.
template <size_t N>
void Tag(uint8_t* p, const char (&tag)[N]) {
  std::memcpy(p, tag, N);
}

std::vector<uint8_t> Bytes(size_t n, uint8_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng()) | 1;  // never 0: zeros mean "nothing written"
  return v;
}

// ---------------------------------------------------------------------------
// The poller alone: exactly the tagged bios fail, each end_io runs once.

// Counts end_io calls of all bios; the notify is under the mutex, so a
// waiter that returned cannot race a late one.
class Completions {
 public:
  void Done() {
    std::lock_guard l(mu_);
    done_++;
    cv_.notify_all();
  }
  // The bound turns a lost completion into a failure, not a hang.
  [[nodiscard]] bool Wait(int n) {
    std::unique_lock l(mu_);
    return cv_.wait_for(l, std::chrono::seconds(60), [&] { return done_ >= n; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int done_ = 0;
};

struct PollerIo {
  Bio bio;
  AlignedBuffer buf;
  Completions* owner = nullptr;
  std::atomic<int> calls{0};
  int32_t result = 0;

  static void EndIo(Bio* bio) {
    auto* io = static_cast<PollerIo*>(bio->private_data);
    io->result = bio->result;
    io->calls.fetch_add(1, std::memory_order_relaxed);
    io->owner->Done();
  }
};

class FaultPollerTest : public testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    ASSERT_NO_FATAL_FAILURE(MakeBacking(dir_.Sub("backing"), 4 * kMiB));
    Status st = Device::Open(dir_.Sub("backing"), &dev_);
    ASSERT_TRUE(st.ok()) << st.message();
  }

  void Start(bool inject) {
    PollerOptions opt;
    opt.ring_depth = 16;  // fewer slots than bios: some wait for a slot
    opt.fault_inject = inject;
    Status st = Poller::Create(*dev_, opt, &poller_);
    ASSERT_TRUE(st.ok()) << st.message();
  }

  PollerIo* Add(Bio::Op op, uint64_t block, uint32_t blocks, uint8_t fill) {
    auto& io = ios_.emplace_back(std::make_unique<PollerIo>());
    io->buf = AlignedBuffer(blocks * kB, 4096);
    std::memset(io->buf.data(), fill, blocks * kB);
    io->bio.op = op;
    io->bio.dev_offset = block * kB;
    io->bio.buf = io->buf.data();
    io->bio.len = static_cast<uint32_t>(blocks * kB);
    io->bio.end_io = PollerIo::EndIo;
    io->bio.private_data = io.get();
    io->owner = &completions_;
    return io.get();
  }

  // Submits every bio added since the last call, waits for all.
  void RunAll() {
    for (size_t i = submitted_; i < ios_.size(); i++) poller_->Submit(&ios_[i]->bio);
    submitted_ = ios_.size();
    ASSERT_TRUE(completions_.Wait(static_cast<int>(ios_.size()))) << "a bio never completed";
  }

  void WriteSync(uint64_t block, const std::vector<uint8_t>& data) {
    AlignedBuffer b(data.size(), 4096);
    std::memcpy(b.data(), data.data(), data.size());
    ASSERT_TRUE(dev_->WriteSync(block * kB, b.data(), static_cast<uint32_t>(data.size())).ok());
  }
  std::vector<uint8_t> ReadSync(uint64_t block, uint32_t blocks) {
    AlignedBuffer b(blocks * kB, 4096);
    EXPECT_TRUE(dev_->ReadSync(block * kB, b.data(), static_cast<uint32_t>(blocks * kB)).ok());
    return std::vector<uint8_t>(b.bytes(), b.bytes() + blocks * kB);
  }

  TempDir dir_;
  std::unique_ptr<Device> dev_;
  Completions completions_;
  std::vector<std::unique_ptr<PollerIo>> ios_;  // outlive the poller (declared before it)
  size_t submitted_ = 0;
  std::unique_ptr<Poller> poller_;
};

TEST_F(FaultPollerTest, ExactlyTheTaggedBiosFail) {
  // Blocks a test reads later, written while nothing is injected.
  auto eio_read = std::vector<uint8_t>(kB, 0x21);
  Tag(eio_read.data(), kFaultEioRead);
  auto short_read = std::vector<uint8_t>(kB, 0x22);
  Tag(short_read.data(), kFaultShortRead);
  auto write_tagged = std::vector<uint8_t>(kB, 0x23);  // a write tag read back: no fault
  Tag(write_tagged.data(), kFaultEioWrite);
  WriteSync(100, eio_read);
  WriteSync(101, short_read);
  WriteSync(102, write_tagged);
  WriteSync(103, std::vector<uint8_t>(kB, 0x24));
  ASSERT_NO_FATAL_FAILURE(Start(true));

  struct Want {
    PollerIo* io;
    int32_t result;
  };
  std::vector<Want> want;
  // 40 rounds of a mix, more than the ring holds at once.
  for (uint64_t i = 0; i < 40; i++) {
    const uint64_t base = 200 + i * 16;
    PollerIo* ok_write = Add(Bio::Op::kWrite, base, 2, 0x30);
    want.push_back({ok_write, static_cast<int32_t>(2 * kB)});
    PollerIo* eio_write = Add(Bio::Op::kWrite, base + 2, 4, 0x31);
    Tag(eio_write->buf.bytes() + 2 * kB, kFaultEioWrite);  // third block of four
    want.push_back({eio_write, -EIO});
    PollerIo* short_write = Add(Bio::Op::kWrite, base + 6, 2, 0x32);
    Tag(short_write->buf.bytes(), kFaultShortWrite);
    want.push_back({short_write, static_cast<int32_t>(kB)});
    PollerIo* read_tag_write = Add(Bio::Op::kWrite, base + 8, 1, 0x33);  // a read tag: written
    Tag(read_tag_write->buf.bytes(), kFaultEioRead);
    want.push_back({read_tag_write, static_cast<int32_t>(kB)});
    want.push_back({Add(Bio::Op::kRead, 100, 1, 0), -EIO});
    want.push_back({Add(Bio::Op::kRead, 101, 1, 0), static_cast<int32_t>(kB / 2)});
    want.push_back({Add(Bio::Op::kRead, 100, 4, 0), -EIO});  // one tagged block fails the bio
    want.push_back({Add(Bio::Op::kRead, 102, 2, 0), static_cast<int32_t>(2 * kB)});
  }
  ASSERT_NO_FATAL_FAILURE(RunAll());
  for (size_t i = 0; i < want.size(); i++) {
    EXPECT_EQ(want[i].io->calls.load(), 1) << "bio " << i;
    EXPECT_EQ(want[i].io->result, want[i].result) << "bio " << i;
  }
  // The good read returned the device's data.
  EXPECT_EQ(std::memcmp(want[7].io->buf.bytes(), write_tagged.data(), kB), 0);
  EXPECT_EQ(want[7].io->buf.bytes()[kB], 0x24);

  // Failed writes never reached the device; the others did.
  for (uint64_t i = 0; i < 40; i++) {
    const uint64_t base = 200 + i * 16;
    auto dev = ReadSync(base, 9);
    for (uint64_t b = 0; b < 9; b++) {
      uint8_t want_byte = b < 2 ? 0x30 : b < 8 ? kStale : 0x33;
      EXPECT_EQ(dev[b * kB + kB - 1], want_byte) << "device block " << base + b;
    }
  }
  poller_.reset();
  EXPECT_EQ(want[0].io->calls.load(), 1) << "end_io ran again at shutdown";
}

TEST_F(FaultPollerTest, OffByDefault) {
  auto eio_read = std::vector<uint8_t>(kB, 0x41);
  Tag(eio_read.data(), kFaultEioRead);
  WriteSync(10, eio_read);
  PollerOptions defaults;
  EXPECT_FALSE(defaults.fault_inject);
  ASSERT_NO_FATAL_FAILURE(Start(false));
  PollerIo* w = Add(Bio::Op::kWrite, 20, 1, 0x42);
  Tag(w->buf.bytes(), kFaultEioWrite);
  PollerIo* s = Add(Bio::Op::kWrite, 21, 1, 0x43);
  Tag(s->buf.bytes(), kFaultShortWrite);
  PollerIo* r = Add(Bio::Op::kRead, 10, 1, 0);
  ASSERT_NO_FATAL_FAILURE(RunAll());
  EXPECT_EQ(w->result, static_cast<int32_t>(kB));
  EXPECT_EQ(s->result, static_cast<int32_t>(kB));
  EXPECT_EQ(r->result, static_cast<int32_t>(kB));
  EXPECT_EQ(ReadSync(20, 1)[kB - 1], 0x42);
}

// ---------------------------------------------------------------------------
// The dio engine in every completion mode.

// One request as the FUSE layer issues it; the Kiocb first, so ki_complete
// gets back to its request.
struct Req {
  Kiocb iocb;
  TaskWork* issuer = nullptr;
  IoBufferPool* pool = nullptr;
  IoBuffer* buf = nullptr;
  size_t data_off = 0;
  ssize_t started = 0;          // what ReadIter/WriteIter returned
  std::atomic<int> replies{0};  // final ki_complete calls: the FUSE reply
  ssize_t res = 0;

  Req() = default;
  Req(const Req&) = delete;
  Req& operator=(const Req&) = delete;
  ~Req() {
    if (queued()) issuer->WaitUntil([this] { return replies.load(std::memory_order_acquire) > 0; });
    if (buf) pool->Put(buf);
  }
  bool queued() const { return started == kIocbQueued; }
  // Replies this request got: its result counts as one if it was not queued.
  int reply_count() const { return replies.load(std::memory_order_acquire) + (queued() ? 0 : 1); }
};
static_assert(std::is_standard_layout_v<Req>);

// FuseKiComplete's twin: a kiocb with dio_complete set goes to its issuer.
void ReqComplete(Kiocb* iocb, ssize_t res) {
  Req* r = reinterpret_cast<Req*>(iocb);
  if (iocb->dio_complete) return r->issuer->Push(iocb);
  r->res = res;
  TaskWork* issuer = r->issuer;  // r may be gone once replies is raised
  r->replies.fetch_add(1, std::memory_order_acq_rel);
  issuer->Wake();
}

class FaultDioTest : public testing::TestWithParam<CompletionMode> {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(Format(DeviceBytes())); }
  virtual uint64_t DeviceBytes() const { return 32 * kMiB; }
  void TearDown() override {
    EXPECT_FALSE(TaskWork::Current()->has_pending()) << "deferred completions left queued";
  }

  void Format(uint64_t bytes) {
    ASSERT_FALSE(dir_.path().empty());
    ASSERT_NO_FATAL_FAILURE(MakeBacking(dir_.Sub("backing"), bytes));
    Superblock sb;
    sb.uuid = NewUuid();
    sb.device_bytes = bytes;
    sb.created_ns = NowNs();
    {
      std::unique_ptr<Device> dev;
      ASSERT_TRUE(Device::Open(dir_.Sub("backing"), &dev).ok());
      AlignedBuffer sbuf(kSuperblockBytes, 4096);
      EncodeSuperblock(sb, sbuf.bytes());
      ASSERT_TRUE(dev->WriteSync(0, sbuf.data(), kSuperblockBytes).ok());
    }
    Status st = MetaStore::Create(dir_.Sub("meta"), sb.uuid, 0, 0);
    ASSERT_TRUE(st.ok()) << st.message();
    ASSERT_NO_FATAL_FAILURE(Mount());
  }

  void Mount() {
    std::unique_ptr<Device> dev;
    Status st = Device::Open(dir_.Sub("backing"), &dev);
    ASSERT_TRUE(st.ok()) << st.message();
    AlignedBuffer sbuf(kSuperblockBytes, 4096);
    ASSERT_TRUE(dev->ReadSync(0, sbuf.data(), kSuperblockBytes).ok());
    Superblock sb;
    ASSERT_TRUE(DecodeSuperblock(sbuf.bytes(), "backing", &sb).ok());
    std::unique_ptr<MetaStore> meta;
    st = MetaStore::Open(dir_.Sub("meta"), sb.uuid, &meta);
    ASSERT_TRUE(st.ok()) << st.message();
    FsOptions opt;
    opt.completion = GetParam();
    opt.pollers = 2;
    opt.cthreads = 2;
    opt.ring_depth = 32;
    opt.io_buffers = 40;
    opt.fault_inject = true;
    st = Filesystem::Mount(std::move(dev), std::move(meta), sb, opt, &fs_);
    ASSERT_TRUE(st.ok()) << st.message();
  }

  Inode* Create(const std::string& name) { return CreateIn(fs_.get(), name); }
  Inode* Open(const std::string& name) { return OpenIn(fs_.get(), name); }

  void Prepare(Req& r, Inode* inode, uint64_t pos, uint32_t flags) {
    r.pool = &fs_->buffers();
    r.buf = r.pool->Get();
    r.issuer = TaskWork::Current();
    r.iocb.inode = inode;
    r.iocb.pos = pos;
    r.iocb.ki_flags = flags | IOCB_DIO_DEFER;
    if (GetParam() != CompletionMode::kSync) r.iocb.ki_complete = ReqComplete;
  }
  // Starts a write with its data in a pool buffer (a FUSE receive buffer).
  void StartWrite(Req& r, Inode* inode, uint64_t pos, const std::vector<uint8_t>& data) {
    ASSERT_LE(data.size(), kMaxIo);
    Prepare(r, inode, pos, IOCB_WRITE);
    std::memcpy(r.buf->base, data.data(), data.size());
    r.started = fs_->WriteIter(&r.iocb, r.buf, r.buf->base, data.size());
  }
  void StartRead(Req& r, Inode* inode, uint64_t pos, size_t len) {
    ASSERT_LE(len, kMaxIo);
    Prepare(r, inode, pos, 0);
    std::memset(r.buf->base, 0x5A, len);
    r.started = fs_->ReadIter(&r.iocb, r.buf, len, &r.data_off);
  }
  // The request's result once it was answered.
  ssize_t Result(Req& r) {
    if (!r.queued()) return r.started;
    TaskWork::Current()->WaitUntil([&r] { return r.replies.load(std::memory_order_acquire) > 0; });
    return r.res;
  }
  // Writes in requests of at most kMaxIo (as FUSE splits them): the bytes
  // written, or the first error.
  ssize_t Write(Inode* inode, uint64_t pos, const std::vector<uint8_t>& data) {
    for (size_t done = 0; done < data.size(); done += kMaxIo) {
      Req r;
      StartWrite(r, inode, pos + done,
                 std::vector<uint8_t>(data.begin() + done, data.begin() + std::min(data.size(), done + kMaxIo)));
      if (ssize_t res = Result(r); res < 0) return res;
    }
    return static_cast<ssize_t>(data.size());
  }
  // Reads [pos, pos+len) the same way: the byte count (with the data in
  // *out) or the first error.
  ssize_t Read(Inode* inode, uint64_t pos, size_t len, std::vector<uint8_t>* out) {
    out->clear();
    for (size_t done = 0; done < len; done += kMaxIo) {
      Req r;
      StartRead(r, inode, pos + done, std::min(len - done, kMaxIo));
      ssize_t res = Result(r);
      if (res < 0) return res;
      out->insert(out->end(), r.buf->base + r.data_off, r.buf->base + r.data_off + res);
      if (static_cast<size_t>(res) < std::min(len - done, kMaxIo)) break;  // EOF
    }
    return static_cast<ssize_t>(out->size());
  }
  struct stat Stat(Inode* inode) {
    struct stat st {};
    EXPECT_TRUE(fs_->GetAttr(inode->ino, &st).ok());
    return st;
  }
  uint64_t FreeBlocks() {
    struct statvfs sv {};
    EXPECT_TRUE(fs_->StatFs(&sv).ok());
    return sv.f_bfree;
  }

  TempDir dir_;
  std::unique_ptr<Filesystem> fs_;
};

std::string ModeName(const testing::TestParamInfo<CompletionMode>& info) {
  return std::string(CompletionModeName(info.param));
}

// Writes of every kind in flight together: exactly the tagged ones fail,
// each request is answered once, a failed write maps nothing and frees
// what it allocated, and the rest of the file is as written.
TEST_P(FaultDioTest, TaggedWritesFailAloneAndLeaveNothingBehind) {
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  const auto old = Bytes(4 * kB, 1);
  ASSERT_EQ(Write(f, 0, old), static_cast<ssize_t>(old.size()));
  // Block 40 preallocated: unwritten, reads as zeros.
  ASSERT_TRUE(fs_->Fallocate(f, FALLOC_FL_KEEP_SIZE, 40 * kB, kB).ok());
  ASSERT_TRUE(fs_->Sync().ok());
  const uint64_t free0 = FreeBlocks();
  const uint64_t errors0 = fs_->engine().stats().errors.load();

  auto tagged = [](size_t n, uint8_t seed, size_t block, auto& tag) {
    auto v = Bytes(n, seed);
    Tag(v.data() + block * kB, tag);
    return v;
  };
  struct Case {
    const char* what;
    uint64_t pos;
    std::vector<uint8_t> data;
    bool fails;
  };
  const Case cases[] = {
      {"allocating EIO", 10 * kB, tagged(kB, 2, 0, kFaultEioWrite), true},
      {"allocating short, tag in block 3 of 4", 20 * kB, tagged(4 * kB, 3, 2, kFaultShortWrite), true},
      {"overwrite EIO", 0, tagged(kB, 4, 0, kFaultEioWrite), true},
      {"overwrite short", 2 * kB, tagged(2 * kB, 5, 1, kFaultShortWrite), true},
      {"unwritten EIO", 40 * kB, tagged(kB, 6, 0, kFaultEioWrite), true},
      {"allocating, no tag", 30 * kB, Bytes(2 * kB, 7), false},
      {"overwrite, no tag", kB, Bytes(kB, 8), false},
      {"extending past every failed write", 50 * kB, Bytes(kB, 9), false},
  };
  constexpr size_t kCases = sizeof(cases) / sizeof(cases[0]);
  std::vector<std::unique_ptr<Req>> reqs;
  for (const Case& c : cases) {
    reqs.push_back(std::make_unique<Req>());
    StartWrite(*reqs.back(), f, c.pos, c.data);
  }
  for (size_t i = 0; i < kCases; i++) {
    ssize_t want = cases[i].fails ? -EIO : static_cast<ssize_t>(cases[i].data.size());
    EXPECT_EQ(Result(*reqs[i]), want) << cases[i].what;
  }
  // Anything still owed runs now; nobody may be answered twice.
  ASSERT_TRUE(fs_->Sync().ok());
  TaskWork::Current()->RunPending();
  for (size_t i = 0; i < kCases; i++) EXPECT_EQ(reqs[i]->reply_count(), 1) << cases[i].what;
  reqs.clear();
  EXPECT_EQ(fs_->engine().stats().errors.load() - errors0, 5u);

  // The file: old data under failed overwrites, zeros under failed
  // allocations and the unwritten block, new data where writes succeeded.
  std::vector<uint8_t> want(51 * kB, 0);
  std::copy(old.begin(), old.end(), want.begin());
  for (const Case& c : cases) {
    if (!c.fails) std::copy(c.data.begin(), c.data.end(), want.begin() + static_cast<ptrdiff_t>(c.pos));
  }
  auto check = [&](const char* when) {
    EXPECT_EQ(static_cast<uint64_t>(Stat(f).st_size), want.size()) << when;
    // Blocks 0-3, 30-31, 40 (still unwritten) and 50: nothing of the failed writes.
    EXPECT_EQ(Stat(f).st_blocks, static_cast<blkcnt_t>(8 * kB / 512)) << when;
    std::vector<uint8_t> got;
    ASSERT_EQ(Read(f, 0, want.size(), &got), static_cast<ssize_t>(want.size())) << when;
    for (size_t i = 0; i < want.size(); i++) {
      ASSERT_EQ(got[i], want[i]) << when << ": file offset " << i << (got[i] == kStale ? " (stale device data)" : "");
    }
  };
  check("after the writes");
  // Only the successful allocations used space: 2 blocks at 30, 1 at 50.
  EXPECT_EQ(FreeBlocks(), free0 - 3);

  // The failed ranges take data again.
  const auto again = Bytes(4 * kB, 10);
  ASSERT_EQ(Write(f, 20 * kB, again), static_cast<ssize_t>(again.size()));
  std::copy(again.begin(), again.end(), want.begin() + 20 * kB);
  ASSERT_TRUE(fs_->Fsync(f, false).ok());
  fs_->Release(f);

  // What the store holds agrees: nothing of the failures was committed.
  const uint64_t free1 = FreeBlocks();
  fs_.reset();
  ASSERT_NO_FATAL_FAILURE(Mount());
  f = Open("f");
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(FreeBlocks(), free1);
  {
    std::vector<uint8_t> got;
    ASSERT_EQ(Read(f, 0, want.size(), &got), static_cast<ssize_t>(want.size()));
    for (size_t i = 0; i < want.size(); i++) ASSERT_EQ(got[i], want[i]) << "after remount: file offset " << i;
  }
  fs_->Release(f);
}

// A block written with a read tag fails every read that covers it (aligned,
// unaligned, or as the read half of an unaligned write); others still read.
TEST_P(FaultDioTest, TaggedReadsFailAndOthersRead) {
  Inode* f = Create("f");
  ASSERT_NE(f, nullptr);
  auto data = Bytes(8 * kB, 11);
  Tag(data.data() + 2 * kB, kFaultEioRead);
  Tag(data.data() + 5 * kB, kFaultShortRead);
  ASSERT_EQ(Write(f, 0, data), static_cast<ssize_t>(data.size()));

  std::vector<std::unique_ptr<Req>> reqs;
  struct Case {
    uint64_t pos;
    size_t len;
    bool fails;
  };
  const Case cases[] = {{0, 2 * kB, false}, {2 * kB, kB, true},  {0, 8 * kB, true},  {5 * kB, kB, true},
                        {6 * kB, 2 * kB, false}, {3 * kB, 2 * kB, false}, {2 * kB + 100, 50, true}};
  for (const Case& c : cases) {
    reqs.push_back(std::make_unique<Req>());
    StartRead(*reqs.back(), f, c.pos, c.len);
  }
  for (size_t i = 0; i < std::size(cases); i++) {
    Req& r = *reqs[i];
    ssize_t res = Result(r);
    if (cases[i].fails) {
      EXPECT_EQ(res, -EIO) << "read " << i;
      continue;
    }
    ASSERT_EQ(res, static_cast<ssize_t>(cases[i].len)) << "read " << i;
    EXPECT_EQ(std::memcmp(r.buf->base + r.data_off, data.data() + cases[i].pos, cases[i].len), 0) << "read " << i;
  }
  TaskWork::Current()->RunPending();
  for (size_t i = 0; i < std::size(cases); i++) EXPECT_EQ(reqs[i]->reply_count(), 1) << "read " << i;
  reqs.clear();

  // An unaligned write into the tagged block fails in its read half and
  // changes nothing.
  EXPECT_EQ(Write(f, 2 * kB + 7, std::vector<uint8_t>(9, 0x77)), -EIO);
  std::vector<uint8_t> got;
  EXPECT_EQ(Read(f, 2 * kB, kB, &got), -EIO) << "the tagged block changed";
  ASSERT_EQ(Read(f, 0, 2 * kB, &got), static_cast<ssize_t>(2 * kB));
  EXPECT_EQ(std::memcmp(got.data(), data.data(), 2 * kB), 0);
  // Overwriting the tag heals the block.
  auto fresh = Bytes(kB, 12);
  ASSERT_EQ(Write(f, 2 * kB, fresh), static_cast<ssize_t>(kB));
  ASSERT_EQ(Read(f, 2 * kB, kB, &got), static_cast<ssize_t>(kB));
  EXPECT_EQ(got, fresh);
  fs_->Release(f);
}

INSTANTIATE_TEST_SUITE_P(Modes, FaultDioTest,
                         testing::Values(CompletionMode::kInline, CompletionMode::kWorkqueue, CompletionMode::kDefer,
                                         CompletionMode::kAuto, CompletionMode::kSync),
                         ModeName);

// ---------------------------------------------------------------------------
// A full device: space freed by punch or unlink is usable at once, without
// an explicit sync (the allocator reclaims it when it runs dry).

class FullDeviceTest : public FaultDioTest {
 protected:
  uint64_t DeviceBytes() const override { return 20 * kMiB; }
};

// An unlinked inode lives while the kernel knows it or a file has it open:
// here the kernel forgets it first, and the last close deletes it.
TEST_P(FullDeviceTest, UnlinkedInodeGoesWhenTheLastOpenAndTheKernelLetGo) {
  const uint64_t empty = FreeBlocks();
  Inode* a = Create("a");  // open, and one kernel reference
  ASSERT_NE(a, nullptr);
  ASSERT_EQ(Write(a, 0, Bytes(kMiB, 1)), static_cast<ssize_t>(kMiB));
  const uint64_t ino = a->rec.ino;
  ASSERT_TRUE(fs_->Unlink(kRootIno, "a").ok());
  const Forgotten all{ino, UINT64_MAX};
  fs_->Forget(std::span(&all, 1));
  struct stat st;
  ASSERT_TRUE(fs_->GetAttr(ino, &st).ok()) << "deleted while open";
  EXPECT_EQ(st.st_nlink, 0u);
  EXPECT_EQ(FreeBlocks(), empty - kMiB / kB);
  fs_->Release(a);
  EXPECT_EQ(fs_->GetAttr(ino, &st).err(), ESTALE) << "still there after the last close";
  EXPECT_EQ(FreeBlocks(), empty);
}

TEST_P(FullDeviceTest, FreedSpaceIsUsableAtOnce) {
  Inode* a = Create("a");
  Inode* b = Create("b");
  ASSERT_TRUE(a && b);
  const auto chunk = Bytes(kMiB, 13);
  uint64_t size = 0;
  for (int i = 0; i < 64; i++, size += kMiB) {
    ssize_t res = Write(a, size, chunk);
    if (res == -ENOSPC) break;
    ASSERT_EQ(res, static_cast<ssize_t>(kMiB));
  }
  for (std::vector<uint8_t> one(kB, 0x3C);; size += kB) {
    ssize_t res = Write(a, size, one);
    if (res == -ENOSPC) break;
    ASSERT_EQ(res, static_cast<ssize_t>(kB));
  }
  ASSERT_EQ(FreeBlocks(), 0u);
  EXPECT_EQ(Write(b, 0, chunk), -ENOSPC);

  // Punch 1 MiB: a 1 MiB write fits right away.
  ASSERT_TRUE(fs_->Fallocate(a, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kMiB).ok());
  EXPECT_EQ(Write(b, 0, chunk), static_cast<ssize_t>(kMiB)) << "space freed by punch not usable at once";
  EXPECT_EQ(Write(b, kMiB, std::vector<uint8_t>(kB, 1)), -ENOSPC);

  // Unlink a (closed): everything of it is usable right away, by every
  // allocating path.
  fs_->Release(a);
  ASSERT_NO_FATAL_FAILURE(UnlinkIn(fs_.get(), "a"));
  const auto more = Bytes(4 * kMiB, 14);
  EXPECT_EQ(Write(b, kMiB, more), static_cast<ssize_t>(more.size())) << "space freed by unlink not usable at once";
  EXPECT_EQ(Write(b, 5 * kMiB + 10, std::vector<uint8_t>(100, 0x55)), 100) << "unaligned write";
  EXPECT_TRUE(fs_->Fallocate(b, 0, 6 * kMiB, kMiB).ok()) << "fallocate";
  ASSERT_TRUE(fs_->Fsync(b, false).ok());
  const uint64_t free1 = FreeBlocks();
  fs_->Release(b);

  fs_.reset();
  ASSERT_NO_FATAL_FAILURE(Mount());
  EXPECT_EQ(FreeBlocks(), free1) << "the free space after a remount disagrees";
  b = Open("b");
  ASSERT_NE(b, nullptr);
  std::vector<uint8_t> got;
  ASSERT_EQ(Read(b, 0, kMiB, &got), static_cast<ssize_t>(kMiB));
  EXPECT_EQ(got, chunk);
  ASSERT_EQ(Read(b, kMiB, 4 * kMiB, &got), static_cast<ssize_t>(4 * kMiB));
  EXPECT_EQ(got, more);
  EXPECT_EQ(Stat(b).st_size, static_cast<off_t>(7 * kMiB));
  fs_->Release(b);
}

INSTANTIATE_TEST_SUITE_P(Modes, FullDeviceTest,
                         testing::Values(CompletionMode::kInline, CompletionMode::kWorkqueue, CompletionMode::kDefer,
                                         CompletionMode::kAuto, CompletionMode::kSync),
                         ModeName);

}  // namespace
}  // namespace deferfs
