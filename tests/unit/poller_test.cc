// Poller against a real O_DIRECT file in a private temporary directory.
#include "backend/poller.h"
#include "tests/unit/temp_dir.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace deferfs {
namespace {


// Counts end_io calls; Wait() returns once `n` have run. The notify happens
// under the mutex so a waiter that returns cannot race a late notify.
class Waiter {
 public:
  void Done() {
    std::lock_guard<std::mutex> l(mu_);
    ++done_;
    cv_.notify_all();
  }
  // The bound only turns a lost wakeup or a lost end_io into a failure
  // instead of a hang; no test depends on how fast IO is.
  [[nodiscard]] bool Wait(uint64_t n) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, std::chrono::seconds(120), [&] { return done_ >= n; });
  }
  uint64_t done() {
    std::lock_guard<std::mutex> l(mu_);
    return done_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t done_ = 0;
};

// One test IO: its bio, its buffer, and how often end_io ran for it.
struct TestIo {
  Bio bio;
  AlignedBuffer buf;
  uint64_t id = 0;
  std::atomic<int> end_io_calls{0};
  Waiter* waiter = nullptr;
};

void TestEndIo(Bio* bio) {
  auto* io = static_cast<TestIo*>(bio->private_data);
  io->end_io_calls.fetch_add(1, std::memory_order_relaxed);
  io->waiter->Done();
}

void InitIo(TestIo* io, Waiter* w, Bio::Op op, uint64_t off, void* buf, uint32_t len) {
  io->waiter = w;
  io->bio.op = op;
  io->bio.dev_offset = off;
  io->bio.buf = buf;
  io->bio.len = len;
  io->bio.end_io = TestEndIo;
  io->bio.private_data = io;
}

uint64_t PatternWord(uint64_t id, uint64_t i) {
  uint64_t x = (id << 32) ^ (i * 0x9E3779B97F4A7C15ull) ^ 0xD1B54A32D192ED03ull;
  x ^= x >> 29;
  x *= 0xBF58476D1CE4E5B9ull;
  return x ^ (x >> 32);
}

void FillPattern(void* buf, uint32_t len, uint64_t id) {
  auto* w = static_cast<uint64_t*>(buf);
  for (uint64_t i = 0; i < len / 8; ++i) w[i] = PatternWord(id, i);
}

// Index of the first wrong word, or -1.
int64_t CheckPattern(const void* buf, uint32_t len, uint64_t id) {
  const auto* w = static_cast<const uint64_t*>(buf);
  for (uint64_t i = 0; i < len / 8; ++i) {
    if (w[i] != PatternWord(id, i)) return static_cast<int64_t>(i);
  }
  return -1;
}

// Stops the poller (completing every bio) when a test body leaves, even
// through a failed ASSERT: declared after the bios and waiters it must not
// outlive.
class StopPollerAtExit {
 public:
  explicit StopPollerAtExit(std::unique_ptr<Poller>& p) : p_(p) {}
  ~StopPollerAtExit() { p_.reset(); }

 private:
  std::unique_ptr<Poller>& p_;
};

class PollerTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_FALSE(dir_.path().empty()); }

  void OpenDevice(uint64_t size) {
    path_ = dir_.path() + "/backing";
    {
      UniqueFd fd(::open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
      ASSERT_TRUE(fd.valid());
      ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
    }
    Status st = Device::Open(path_, &dev_);
    ASSERT_TRUE(st.ok()) << st.ToString();
    align_ = dev_->dio_align();
  }

  void StartPoller(PollerOptions opt = {}) {
    Status st = Poller::Create(*dev_, opt, &poller_);
    ASSERT_TRUE(st.ok()) << st.ToString();
  }

  // Submits one IO and waits for its end_io; returns bio.result.
  int32_t RunOne(Bio::Op op, uint64_t off, void* buf, uint32_t len, int buf_index = -1) {
    Waiter w;
    TestIo io;
    InitIo(&io, &w, op, off, buf, len);
    io.bio.buf_index = buf_index;
    if (poller_ == nullptr) return INT32_MIN;  // stopped by an earlier failure
    poller_->Submit(&io.bio);
    if (!w.Wait(1)) {
      ADD_FAILURE() << "end_io never ran";
      poller_.reset();  // completes the bio before `io` dies
      return INT32_MIN;
    }
    EXPECT_EQ(io.end_io_calls.load(), 1);
    return io.bio.result;
  }

  TempDir dir_;
  std::string path_;
  std::unique_ptr<Device> dev_;
  uint32_t align_ = 512;
  std::unique_ptr<Poller> poller_;  // declared last: stopped before the device closes
};

TEST_F(PollerTest, ConcurrentRandomWritesReadBack) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 2000;
  constexpr uint32_t k4K = 4096;
  std::mt19937_64 rng(12345);

  // Non-overlapping extents of 4 KiB..1 MiB (mostly small, so the file stays
  // ~100 MiB), packed, then shuffled: every thread writes random offsets.
  std::vector<std::pair<uint64_t, uint32_t>> extents;
  uint64_t end = 0;
  for (int i = 0; i < kThreads * kPerThread; ++i) {
    uint32_t len;
    if (i < kThreads) {
      len = 1 << 20;  // at least one 1 MiB bio per thread
    } else if (i % 64 == 0) {
      len = k4K << (rng() % 9);  // 4 KiB .. 1 MiB
    } else {
      len = k4K << (rng() % 3);  // 4 .. 16 KiB
    }
    extents.emplace_back(end, len);
    end += len;
  }
  std::shuffle(extents.begin(), extents.end(), rng);
  OpenDevice(end);
  PollerOptions opt;
  opt.ring_depth = 16;  // CQ 32: far fewer slots than bios, so bios queue up
  StartPoller(opt);

  std::vector<std::unique_ptr<TestIo>> ios(extents.size());
  Waiter writes, reads;
  StopPollerAtExit stop_first(poller_);
  for (size_t i = 0; i < ios.size(); ++i) {
    ios[i] = std::make_unique<TestIo>();
    TestIo& io = *ios[i];
    io.id = i;
    io.buf = AlignedBuffer(extents[i].second, align_);
    ASSERT_NE(io.buf.data(), nullptr);
    FillPattern(io.buf.data(), extents[i].second, i);
    InitIo(&io, &writes, Bio::Op::kWrite, extents[i].first, io.buf.data(), extents[i].second);
  }

  auto submit_all = [&] {
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        for (int i = t * kPerThread; i < (t + 1) * kPerThread; ++i) poller_->Submit(&ios[i]->bio);
      });
    }
    for (auto& th : threads) th.join();
  };
  submit_all();
  ASSERT_TRUE(writes.Wait(ios.size())) << writes.done() << " of " << ios.size();
  for (auto& io : ios) {
    ASSERT_EQ(io->end_io_calls.load(), 1) << "bio " << io->id;
    ASSERT_EQ(io->bio.result, static_cast<int32_t>(io->bio.len)) << "bio " << io->id;
  }

  // Read back through the poller into the same (cleared) buffers.
  for (auto& io : ios) {
    std::memset(io->buf.data(), 0, io->buf.size());
    io->end_io_calls.store(0);
    io->bio.result = 0;
    InitIo(io.get(), &reads, Bio::Op::kRead, io->bio.dev_offset, io->buf.data(), io->bio.len);
  }
  submit_all();
  ASSERT_TRUE(reads.Wait(ios.size())) << reads.done() << " of " << ios.size();
  for (auto& io : ios) {
    ASSERT_EQ(io->end_io_calls.load(), 1) << "bio " << io->id;
    ASSERT_EQ(io->bio.result, static_cast<int32_t>(io->bio.len)) << "bio " << io->id;
    ASSERT_EQ(CheckPattern(io->buf.data(), io->bio.len, io->id), -1) << "bio " << io->id;
  }

  // The bytes are where they were meant to go, by an independent path.
  UniqueFd fd(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
  std::vector<uint8_t> plain(1 << 20);
  for (auto& io : ios) {
    ASSERT_EQ(::pread(fd.get(), plain.data(), io->bio.len, static_cast<off_t>(io->bio.dev_offset)),
              static_cast<ssize_t>(io->bio.len));
    ASSERT_EQ(CheckPattern(plain.data(), io->bio.len, io->id), -1) << "bio " << io->id;
  }

  Poller::Stats s = poller_->stats();
  EXPECT_EQ(s.submitted, 2 * ios.size());
  EXPECT_EQ(s.completed, s.submitted);
  EXPECT_EQ(s.wakeups_made + s.wakeups_avoided, s.submitted);
  EXPECT_GT(s.submit_batches, 0u);
  EXPECT_LE(s.submit_batches, s.submitted + s.sleeps + 1);
}

TEST_F(PollerTest, RegisteredBuffers) {
  OpenDevice(8 << 20);
  AlignedBuffer reg0(1 << 20, align_), reg1(256 << 10, align_), unregistered(64 << 10, align_);
  PollerOptions opt;
  opt.buffers = {{reg0.data(), reg0.size()}, {reg1.data(), reg1.size()}};
  StartPoller(opt);

  const uint32_t len = 64 << 10;
  uint8_t* src = reg0.bytes() + 8192;
  uint8_t* dst = reg1.bytes() + 4096;
  FillPattern(src, len, 77);
  EXPECT_EQ(RunOne(Bio::Op::kWrite, 1 << 20, src, len, /*buf_index=*/0), static_cast<int32_t>(len));
  EXPECT_EQ(RunOne(Bio::Op::kRead, 1 << 20, dst, len, /*buf_index=*/1), static_cast<int32_t>(len));
  EXPECT_EQ(CheckPattern(dst, len, 77), -1);

  // Proof that buf_index selects read_fixed/write_fixed: a buffer outside
  // the registered one is refused by the kernel (a plain read would succeed).
  EXPECT_LT(RunOne(Bio::Op::kRead, 0, unregistered.data(), len, /*buf_index=*/0), 0);
  // An index past the registered table is the caller's bug: -EINVAL.
  EXPECT_EQ(RunOne(Bio::Op::kRead, 0, dst, len, /*buf_index=*/2), -EINVAL);
  // Plain bios still work next to fixed ones.
  EXPECT_EQ(RunOne(Bio::Op::kRead, 1 << 20, unregistered.data(), len), static_cast<int32_t>(len));
  EXPECT_EQ(CheckPattern(unregistered.data(), len, 77), -1);
}

TEST_F(PollerTest, InvalidIoFailsThatBioOnly) {
  const uint64_t size = 4 << 20;
  OpenDevice(size);
  StartPoller();
  AlignedBuffer buf(128 << 10, align_);
  const uint32_t len = 64 << 10;

  // Misaligned offset, length or buffer: -EINVAL on every backing (ext4
  // itself would quietly fall back to buffered IO).
  EXPECT_EQ(RunOne(Bio::Op::kRead, 512 / 2, buf.data(), len), -EINVAL);
  EXPECT_EQ(RunOne(Bio::Op::kWrite, 1, buf.data(), len), -EINVAL);
  EXPECT_EQ(RunOne(Bio::Op::kWrite, 0, buf.bytes() + 1, len), -EINVAL);
  EXPECT_EQ(RunOne(Bio::Op::kRead, 0, buf.data(), len - 1), -EINVAL);
  // Zero-length and bogus-op bios are rejected before the kernel.
  EXPECT_EQ(RunOne(Bio::Op::kRead, 0, buf.data(), 0), -EINVAL);
  EXPECT_EQ(RunOne(static_cast<Bio::Op>(42), 0, buf.data(), len), -EINVAL);
  // Past the end: nothing to read is an IO error, not success.
  EXPECT_EQ(RunOne(Bio::Op::kRead, size, buf.data(), len), -EIO);
  // Across the end: the short first part is continued, the rest hits EOF.
  EXPECT_EQ(RunOne(Bio::Op::kRead, size - 4096, buf.data(), 8192), -EIO);
  // A buffer the kernel cannot touch: the error comes from the kernel, via
  // the CQE, to this bio only.
  void* none = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(none, MAP_FAILED);
  EXPECT_EQ(RunOne(Bio::Op::kWrite, 0, none, len), -EFAULT);
  EXPECT_EQ(RunOne(Bio::Op::kRead, 0, none, len), -EFAULT);
  munmap(none, len);

  // The poller survived all of it.
  FillPattern(buf.data(), len, 5);
  EXPECT_EQ(RunOne(Bio::Op::kWrite, 8192, buf.data(), len), static_cast<int32_t>(len));
  std::memset(buf.data(), 0, len);
  EXPECT_EQ(RunOne(Bio::Op::kRead, 8192, buf.data(), len), static_cast<int32_t>(len));
  EXPECT_EQ(CheckPattern(buf.data(), len, 5), -1);
  ASSERT_NE(poller_, nullptr);
  Poller::Stats s = poller_->stats();
  EXPECT_EQ(s.completed, s.submitted);
}

TEST_F(PollerTest, FlushBiosComplete) {
  OpenDevice(4 << 20);
  StartPoller();
  AlignedBuffer buf(4096, align_);
  FillPattern(buf.data(), 4096, 9);
  Waiter w;
  std::vector<std::unique_ptr<TestIo>> ios;
  StopPollerAtExit stop_first(poller_);
  for (int i = 0; i < 16; ++i) {
    ios.push_back(std::make_unique<TestIo>());
    InitIo(ios.back().get(), &w, Bio::Op::kWrite, uint64_t(i) * 4096, buf.data(), 4096);
    ios.push_back(std::make_unique<TestIo>());
    InitIo(ios.back().get(), &w, Bio::Op::kFlush, 0, nullptr, 0);
  }
  for (auto& io : ios) poller_->Submit(&io->bio);
  ASSERT_TRUE(w.Wait(ios.size())) << w.done() << " of " << ios.size();
  for (auto& io : ios) {
    EXPECT_EQ(io->end_io_calls.load(), 1);
    EXPECT_EQ(io->bio.result, io->bio.op == Bio::Op::kFlush ? 0 : 4096);
  }
}

TEST_F(PollerTest, DestructionCompletesEveryInFlightBioOnce) {
  OpenDevice(64 << 20);
  PollerOptions opt;
  opt.ring_depth = 8;
  StartPoller(opt);
  constexpr int kThreads = 2, kPerThread = 600;
  AlignedBuffer buf(64 << 10, align_);
  Waiter w;
  std::vector<std::unique_ptr<TestIo>> ios;
  StopPollerAtExit stop_first(poller_);
  for (int i = 0; i < kThreads * kPerThread; ++i) {
    ios.push_back(std::make_unique<TestIo>());
    const uint32_t len = 4096u << (i % 5);
    const Bio::Op op = i % 7 == 6 ? Bio::Op::kFlush : (i % 2 ? Bio::Op::kRead : Bio::Op::kWrite);
    InitIo(ios.back().get(), &w, op, uint64_t(i % 512) * (64 << 10), buf.data(), len);
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = t * kPerThread; i < (t + 1) * kPerThread; ++i) poller_->Submit(&ios[i]->bio);
    });
  }
  for (auto& th : threads) th.join();
  poller_.reset();  // most of them are still queued or in flight
  EXPECT_EQ(w.done(), ios.size());
  for (auto& io : ios) {
    EXPECT_EQ(io->end_io_calls.load(), 1);
    EXPECT_EQ(io->bio.result, io->bio.op == Bio::Op::kFlush ? 0 : int32_t(io->bio.len));
  }
}

TEST_F(PollerTest, SleepsWhenIdleAndSubmitWakesIt) {
  OpenDevice(1 << 20);
  StartPoller();
  // Waits (liveness bound only) until the poller has slept more than `n`
  // times. Once it sleeps nothing but a Submit can wake it.
  auto wait_sleeps_above = [&](uint64_t n) {
    for (int i = 0; i < 10000 && poller_->stats().sleeps <= n; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return poller_->stats().sleeps > n;
  };
  ASSERT_TRUE(wait_sleeps_above(0));
  Poller::Stats s0 = poller_->stats();
  EXPECT_EQ(s0.submitted, 0u);
  EXPECT_EQ(s0.wakeups_made, 0u);

  // end_io runs on the poller thread, before the poller can sleep again:
  // the count it sees excludes the sleep that follows this bio.
  struct Probe {
    Poller* poller;
    uint64_t sleeps_at_end_io = 0;
    Waiter done;
  } probe{poller_.get(), 0, {}};
  AlignedBuffer buf(4096, align_);
  Bio bio;
  bio.op = Bio::Op::kRead;
  bio.buf = buf.data();
  bio.len = 4096;
  bio.private_data = &probe;
  StopPollerAtExit stop_first(poller_);
  bio.end_io = [](Bio* b) {
    auto* p = static_cast<Probe*>(b->private_data);
    p->sleeps_at_end_io = p->poller->stats().sleeps;
    p->done.Done();
  };

  for (uint64_t round = 1; round <= 3; ++round) {
    poller_->Submit(&bio);  // it sleeps, so this submit must pay a wakeup
    ASSERT_TRUE(probe.done.Wait(round)) << "round " << round;
    EXPECT_EQ(bio.result, 4096);
    Poller::Stats s = poller_->stats();
    EXPECT_EQ(s.wakeups_made, round);
    EXPECT_EQ(s.wakeups_avoided, 0u);
    EXPECT_EQ(s.submitted, round);
    EXPECT_EQ(s.completed, round);
    // One enter to submit per wakeup: the bio's. Re-arming the eventfd read
    // after the wakeup waits for the sleep's own enter instead of costing one.
    EXPECT_EQ(s.submit_batches, round);
    // And it goes back to sleep on its own.
    ASSERT_TRUE(wait_sleeps_above(probe.sleeps_at_end_io)) << "round " << round;
  }
}

TEST_F(PollerTest, SubmitFromEndIoIsServed) {
  // end_io runs on the poller thread and may issue the next bio (a dio
  // layer does); that Submit must not need a wakeup to make progress.
  OpenDevice(1 << 20);
  StartPoller();
  AlignedBuffer buf(4096, align_);
  struct Chain {
    Poller* poller;
    int left;
    Waiter done;
  } chain{poller_.get(), 100, {}};
  Bio bio;
  bio.op = Bio::Op::kRead;
  bio.buf = buf.data();
  bio.len = 4096;
  bio.private_data = &chain;
  StopPollerAtExit stop_first(poller_);
  bio.end_io = [](Bio* b) {
    auto* c = static_cast<Chain*>(b->private_data);
    if (b->result != 4096 || --c->left == 0) return c->done.Done();
    c->poller->Submit(b);
  };
  poller_->Submit(&bio);
  ASSERT_TRUE(chain.done.Wait(1));
  EXPECT_EQ(chain.left, 0);
  EXPECT_EQ(bio.result, 4096);
  EXPECT_EQ(poller_->stats().submitted, 100u);
}

TEST_F(PollerTest, BioFromEndIoIsIssuedBeforeTheNextCompletionRuns) {
  // A bio that arrives while completions are run goes to the device before
  // the next end_io: a batch of FUSE replies must not hold it back. The
  // first end_io submits one and sleeps, so that the rest of the batch has
  // completed (its CQEs are posted when the sleep returns); the next end_io
  // must find it submitted. The batch is submitted by a starter bio's end_io
  // so that it is issued whole.
  OpenDevice(1 << 20);
  StartPoller();
  constexpr int kBatch = 8;
  struct Probe {
    Poller* poller;
    Bio extra;
    std::atomic<int> end_ios{0};
    uint64_t batches_before = 0;
    std::atomic<bool> checked{false}, issued_first{false};
    std::vector<Bio>* batch = nullptr;
    Waiter done;
  } probe{poller_.get(), {}, {}, 0, {}, {}, nullptr, {}};
  AlignedBuffer extra_buf(4096, align_);
  probe.extra.op = Bio::Op::kRead;
  probe.extra.buf = extra_buf.data();
  probe.extra.len = 4096;
  probe.extra.private_data = &probe;
  probe.extra.end_io = [](Bio* b) { static_cast<Probe*>(b->private_data)->done.Done(); };
  std::vector<AlignedBuffer> bufs;
  std::vector<Bio> bios(kBatch);
  for (int i = 0; i < kBatch; ++i) {
    bufs.emplace_back(4096, align_);
    bios[i].op = Bio::Op::kRead;
    bios[i].dev_offset = static_cast<uint64_t>(i) * 4096;
    bios[i].buf = bufs.back().data();
    bios[i].len = 4096;
    bios[i].private_data = &probe;
    bios[i].end_io = [](Bio* b) {
      auto* p = static_cast<Probe*>(b->private_data);
      const int nth = p->end_ios.fetch_add(1) + 1;
      if (nth == 1) {
        p->batches_before = p->poller->stats().submit_batches;
        p->poller->Submit(&p->extra);
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      } else if (nth == 2) {
        p->issued_first = p->poller->stats().submit_batches > p->batches_before;
        p->checked = true;
      }
      p->done.Done();
    };
  }
  probe.batch = &bios;
  Bio starter;
  AlignedBuffer starter_buf(4096, align_);
  starter.op = Bio::Op::kRead;
  starter.buf = starter_buf.data();
  starter.len = 4096;
  starter.private_data = &probe;
  starter.end_io = [](Bio* b) {
    auto* p = static_cast<Probe*>(b->private_data);
    for (Bio& bio : *p->batch) p->poller->Submit(&bio);
  };
  StopPollerAtExit stop_first(poller_);
  poller_->Submit(&starter);
  ASSERT_TRUE(probe.done.Wait(kBatch + 1));
  ASSERT_TRUE(probe.checked.load());
  EXPECT_TRUE(probe.issued_first.load());
  for (const Bio& b : bios) EXPECT_EQ(b.result, 4096);
  EXPECT_EQ(probe.extra.result, 4096);
}

TEST_F(PollerTest, CreateFailsCleanlyOnBadOptions) {
  OpenDevice(1 << 20);
  std::unique_ptr<Poller> p;
  PollerOptions opt;
  opt.ring_depth = 0;
  EXPECT_EQ(Poller::Create(*dev_, opt, &p).err(), EINVAL);
  opt.ring_depth = 1;  // the eventfd read could fill it, leaving a bio no room
  EXPECT_EQ(Poller::Create(*dev_, opt, &p).err(), EINVAL);
  opt.ring_depth = 1u << 20;  // beyond IORING_MAX_ENTRIES
  EXPECT_FALSE(Poller::Create(*dev_, opt, &p).ok());
  EXPECT_EQ(p, nullptr);
}

}  // namespace
}  // namespace deferfs
