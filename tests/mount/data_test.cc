// The data path on a real mount, in every completion mode: fio with
// checksummed verification, a randomized operation sequence checked against
// an in-memory model of the file, SEEK_DATA/SEEK_HOLE, persistence, no stale
// device data, ENOSPC, and freeing the blocks of an unlinked open file.
// ext4 is the reference: with DEFERFS_TEST_DIR=<ext4 dir> the tests that do
// not need deferfs itself run there unchanged (Remount() is then a no-op).
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/io_helpers.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kBlock = 4096;
constexpr uint8_t kStale = 0x5A;  // what a pre-filled backing holds everywhere

uint64_t RoundDown(uint64_t v, uint64_t a = kBlock) { return v / a * a; }
uint64_t RoundUp(uint64_t v, uint64_t a = kBlock) { return (v + a - 1) / a * a; }

// ------------------------------------------------------------------ helpers

UniqueFd OpenOrFail(const std::string& path, int flags, mode_t mode = 0644) {
  UniqueFd fd(open(path.c_str(), flags | O_CLOEXEC, mode));
  if (!fd.ok()) ADD_FAILURE() << "open " << path << " (flags 0x" << std::hex << flags << "): " << strerror(errno);
  return fd;
}

// syncfs(2) on the file system holding `path`.
void SyncFs(const std::string& path) {
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  ASSERT_EQ(syncfs(fd.get()), 0) << "syncfs: " << strerror(errno);
}

// Writes `data` at `off` through an O_DIRECT descriptor (aligned bounce).
int DirectWrite(int fd, const uint8_t* data, size_t len, off_t off) {
  AlignedBuf buf(len);
  std::memcpy(buf.data(), data, len);
  return PwriteFull(fd, buf.data(), len, off);
}

// The whole file vs. `want` (the device's view), plus st_size.
::testing::AssertionResult FileIs(const std::string& path, const std::vector<uint8_t>& want) {
  bool ok = false;
  std::vector<uint8_t> got = ReadAllDirect(path, &ok);
  if (!ok) return ::testing::AssertionFailure() << "cannot read " << path;
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << path << ": size " << got.size() << ", want " << want.size();
  }
  return SameBytes(want.data(), got.data(), want.size()) << " (" << path << ")";
}

// The whole file through the page cache.
::testing::AssertionResult BufferedFileIs(const std::string& path, const std::vector<uint8_t>& want) {
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.ok()) return ::testing::AssertionFailure() << "open " << path << ": " << strerror(errno);
  std::vector<uint8_t> got(want.size() + kBlock);
  ssize_t n = PreadUpTo(fd.get(), got.data(), got.size(), 0);
  if (n < 0) return ::testing::AssertionFailure() << "read " << path << ": " << strerror(static_cast<int>(-n));
  if (static_cast<size_t>(n) != want.size()) {
    return ::testing::AssertionFailure() << path << ": buffered read returned " << n << " bytes, want " << want.size();
  }
  return SameBytes(want.data(), got.data(), want.size()) << " (buffered read of " << path << ")";
}

::testing::AssertionResult NoStaleBytes(const std::string& path) {
  bool ok = false;
  std::vector<uint8_t> got = ReadAllDirect(path, &ok);
  if (!ok) return ::testing::AssertionFailure() << "cannot read " << path;
  int64_t at = FindByte(got.data(), got.size(), kStale);
  if (at < 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << path << ": stale device byte 0x5A visible at offset " << at;
}

// -------------------------------------------------------------- fixtures

// Cheap tests: every mode, and every mode again with other thread counts.
class DataTest : public ::testing::TestWithParam<MountVariant> {
 protected:
  bool reference() const {
    const char* d = getenv("DEFERFS_TEST_DIR");
    return d != nullptr && *d != '\0';
  }
};

// fio tests: every mode with the default thread counts.
class DataFioTest : public DataTest {
 protected:
  void SetUp() override {
    fs_.emplace(GetParam().Config());
    ASSERT_TRUE(fs_->ok()) << "mount failed";
  }
  void TearDown() override { fs_.reset(); }

  // Runs fio and fails the test on a non-zero exit (a verify mismatch included).
  void Fio(const std::string& file, const std::vector<std::string>& args) {
    std::vector<std::string> all = {"--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
                                     "--randrepeat=1", "--group_reporting"};
    all.insert(all.end(), args.begin(), args.end());
    RunResult r = RunFio("data", fs_->path(file), all);
    ASSERT_TRUE(FioSucceeded(r, *fs_)) << "args:" << Join(all);
    // A verify failure is also reported in the output; be explicit about it.
    EXPECT_EQ(r.out.find("verify: bad"), std::string::npos) << r.out;
  }
  static std::string Join(const std::vector<std::string>& v) {
    std::string s;
    for (const auto& a : v) s += " " + a;
    return s;
  }

  std::optional<MountedFs> fs_;
};

// ------------------------------------------------------------------- fio

const std::vector<std::string> kRand4k = {"--rw=randwrite", "--bs=4k", "--direct=1", "--iodepth=16", "--size=16M"};

std::vector<std::string> With(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST_P(DataFioTest, RandWrite4kLibaioVerifies) { Fio("f", With(kRand4k, {"--ioengine=libaio"})); }

// Also re-verified after a remount: what fio wrote is what the device keeps.
TEST_P(DataFioTest, RandWrite4kIoUringVerifiesAndPersists) {
  const auto args = With(kRand4k, {"--ioengine=io_uring"});
  Fio("f", args);
  ASSERT_TRUE(fs_->Remount());
  Fio("f", With(args, {"--verify_only"}));
}

TEST_P(DataFioTest, MixedBlockSizesVerify) {
  Fio("f", {"--rw=randwrite", "--bssplit=4k/30:8k/20:32k/20:64k/15:128k/15", "--direct=1", "--ioengine=io_uring",
            "--iodepth=16", "--size=24M"});
}

// Buffered, sub-block sizes at 1k-aligned offsets: deferfs' read-modify-write.
TEST_P(DataFioTest, BufferedUnalignedWithFsyncVerifies) {
  Fio("f", {"--rw=randwrite", "--bsrange=1k-16k", "--ioengine=psync", "--fsync=1", "--size=2M"});
}

// Written through mmap, verified through mmap and then from the device.
TEST_P(DataFioTest, MmapVerifies) {
  const std::vector<std::string> args = {"--rw=randwrite", "--bs=4k", "--size=8M"};
  Fio("f", With(args, {"--ioengine=mmap"}));
  Fio("f", With(args, {"--ioengine=psync", "--direct=1", "--verify_only"}));
}

// ----------------------------------------------- randomized ops vs a model

constexpr uint64_t kModelMax = 1 * kMiB;  // offsets and sizes stay below this

// One file, driven through an O_DIRECT and a buffered descriptor plus mmap,
// mirrored byte for byte in `model`.
class ModelRun {
 public:
  ModelRun(std::string path, uint64_t seed) : path_(std::move(path)), rng_(seed) {}

  bool Open() {
    bfd_ = OpenOrFail(path_, O_RDWR | O_CREAT);
    dfd_ = OpenOrFail(path_, O_RDWR | O_DIRECT);
    return bfd_.ok() && dfd_.ok();
  }
  void Close() {
    bfd_.reset();
    dfd_.reset();
  }
  int Fsync() { return fsync(dfd_.get()) == 0 && fsync(bfd_.get()) == 0 ? 0 : errno; }

  const std::vector<uint8_t>& model() const { return model_; }

  // Runs one random operation; a failure names it and the ones before.
  ::testing::AssertionResult Step() {
    std::ostringstream op;
    ::testing::AssertionResult r = RandomOp(op);
    history_.push_back(op.str());
    if (history_.size() > 12) history_.pop_front();
    if (!r) r << "\nlast operations (oldest first):\n" << History();
    return r;
  }

  // The whole file (device view and size) against the model.
  ::testing::AssertionResult Check() {
    struct stat st{};
    if (fstat(bfd_.get(), &st) != 0) return ::testing::AssertionFailure() << "fstat: " << strerror(errno);
    if (static_cast<uint64_t>(st.st_size) != model_.size()) {
      return ::testing::AssertionFailure() << "st_size " << st.st_size << ", model " << model_.size() << "\n"
                                           << History();
    }
    auto r = FileIs(path_, model_);
    if (!r) r << "\nlast operations (oldest first):\n" << History();
    return r;
  }

  std::string History() const {
    std::string s;
    for (const auto& h : history_) s += "  " + h + "\n";
    return s;
  }

 private:
  uint64_t Rand(uint64_t lo, uint64_t hi) { return std::uniform_int_distribution<uint64_t>(lo, hi)(rng_); }

  void Grow(uint64_t end) {
    if (end > model_.size()) model_.resize(end, 0);
  }
  void Zero(uint64_t off, uint64_t end) {
    end = std::min<uint64_t>(end, model_.size());
    if (off < end) std::fill(model_.begin() + off, model_.begin() + end, 0);
  }
  static ::testing::AssertionResult Failed(const std::string& what, int err) {
    return ::testing::AssertionFailure() << what << ": " << strerror(err);
  }

  ::testing::AssertionResult RandomOp(std::ostringstream& op) {
    const uint64_t size = model_.size();
    switch (Rand(0, 12)) {
      case 0:
      case 1: {  // O_DIRECT write, block aligned
        uint64_t off = RoundDown(Rand(0, kModelMax - kBlock));
        uint64_t len = std::min(Rand(1, 64) * kBlock, kModelMax - off);
        op << "direct pwrite off=" << off << " len=" << len;
        AlignedBuf buf(len);
        FillRandom(rng_, buf.data(), len);
        if (int e = PwriteFull(dfd_.get(), buf.data(), len, static_cast<off_t>(off)); e) return Failed(op.str(), e);
        Grow(off + len);
        std::memcpy(model_.data() + off, buf.data(), len);
        return ::testing::AssertionSuccess();
      }
      case 2:
      case 3: {  // buffered write, anywhere, any length
        uint64_t off = Rand(0, kModelMax - 1);
        uint64_t len = std::min<uint64_t>(Rand(1, 20000), kModelMax - off);
        op << "buffered pwrite off=" << off << " len=" << len;
        return BufferedWrite(off, len);
      }
      case 10:
      case 11: {  // buffered write where the last one ended: an append in pieces
        if (append_at_ >= kModelMax) return Noop(op);
        uint64_t len = std::min<uint64_t>(Rand(1, 20000), kModelMax - append_at_);
        op << "buffered pwrite continuing off=" << append_at_ << " len=" << len;
        return BufferedWrite(append_at_, len);
      }
      case 4: {  // truncate up or down, aligned or not
        uint64_t n = Rand(0, 3) == 0 ? RoundDown(Rand(0, kModelMax)) : Rand(0, kModelMax);
        op << "ftruncate " << size << " -> " << n;
        if (ftruncate(bfd_.get(), static_cast<off_t>(n)) != 0) return Failed(op.str(), errno);
        model_.resize(n, 0);
        return ::testing::AssertionSuccess();
      }
      case 5: {  // fallocate, with or without KEEP_SIZE, may reach past EOF
        uint64_t off = Rand(0, kModelMax - 1);
        uint64_t len = std::min<uint64_t>(Rand(1, 200000), kModelMax - off);
        const bool keep = Rand(0, 1);
        op << "fallocate(" << (keep ? "KEEP_SIZE" : "0") << ") off=" << off << " len=" << len;
        if (fallocate(bfd_.get(), keep ? FALLOC_FL_KEEP_SIZE : 0, static_cast<off_t>(off), static_cast<off_t>(len))) {
          return Failed(op.str(), errno);
        }
        if (!keep) Grow(off + len);
        return ::testing::AssertionSuccess();
      }
      case 6: {  // punch a hole (KEEP_SIZE), unaligned edges
        uint64_t off = Rand(0, kModelMax - 1);
        uint64_t len = std::min<uint64_t>(Rand(1, 200000), kModelMax - off);
        op << "punch off=" << off << " len=" << len;
        if (fallocate(bfd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                      static_cast<off_t>(len))) {
          return Failed(op.str(), errno);
        }
        Zero(off, off + len);
        return ::testing::AssertionSuccess();
      }
      case 7: {  // zero a range; grows the file like fallocate(0)
        uint64_t off = Rand(0, kModelMax - 1);
        uint64_t len = std::min<uint64_t>(Rand(1, 200000), kModelMax - off);
        op << "zero_range off=" << off << " len=" << len;
        if (fallocate(bfd_.get(), FALLOC_FL_ZERO_RANGE, static_cast<off_t>(off), static_cast<off_t>(len))) {
          return Failed(op.str(), errno);
        }
        Grow(off + len);
        Zero(off, off + len);
        return ::testing::AssertionSuccess();
      }
      case 8: {  // mmap: write a region inside EOF, msync
        if (size < kBlock) return Noop(op);
        uint64_t map_off = RoundDown(Rand(0, size - 1));
        uint64_t map_len = std::min<uint64_t>(size - map_off, 256 * kKiB);
        uint64_t a = Rand(0, map_len - 1);
        uint64_t len = Rand(1, map_len - a);
        op << "mmap write off=" << map_off + a << " len=" << len;
        void* p = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, bfd_.get(), static_cast<off_t>(map_off));
        if (p == MAP_FAILED) return Failed(op.str() + " (mmap)", errno);
        std::vector<uint8_t> data = RandomBytes(rng_, len);
        std::memcpy(static_cast<uint8_t*>(p) + a, data.data(), len);
        int err = msync(p, map_len, MS_SYNC) == 0 ? 0 : errno;
        munmap(p, map_len);
        if (err) return Failed(op.str() + " (msync)", err);
        std::memcpy(model_.data() + map_off + a, data.data(), len);
        return ::testing::AssertionSuccess();
      }
      case 9: {  // mmap read of a region
        if (size == 0) return Noop(op);
        uint64_t map_off = RoundDown(Rand(0, size - 1));
        uint64_t map_len = std::min<uint64_t>(size - map_off, 256 * kKiB);
        op << "mmap read off=" << map_off << " len=" << map_len;
        void* p = mmap(nullptr, map_len, PROT_READ, MAP_SHARED, bfd_.get(), static_cast<off_t>(map_off));
        if (p == MAP_FAILED) return Failed(op.str(), errno);
        auto r = SameBytes(model_.data() + map_off, static_cast<const uint8_t*>(p), map_len, map_off);
        munmap(p, map_len);
        return r << " (" << op.str() << ")";
      }
      default: {  // buffered pread of a random range
        if (size == 0) return Noop(op);
        uint64_t off = Rand(0, size - 1);
        uint64_t len = Rand(1, std::min<uint64_t>(size - off, 64 * kKiB));
        op << "buffered pread off=" << off << " len=" << len;
        std::vector<uint8_t> got(len);
        ssize_t n = PreadUpTo(bfd_.get(), got.data(), len, static_cast<off_t>(off));
        if (n < 0) return Failed(op.str(), static_cast<int>(-n));
        if (static_cast<uint64_t>(n) != len) return ::testing::AssertionFailure() << op.str() << ": short read " << n;
        return SameBytes(model_.data() + off, got.data(), len, off) << " (" << op.str() << ")";
      }
    }
  }
  ::testing::AssertionResult BufferedWrite(uint64_t off, uint64_t len) {
    std::vector<uint8_t> data = RandomBytes(rng_, len);
    if (int e = PwriteFull(bfd_.get(), data.data(), len, static_cast<off_t>(off)); e) {
      return Failed("buffered pwrite", e);
    }
    Grow(off + len);
    std::memcpy(model_.data() + off, data.data(), len);
    append_at_ = off + len;
    return ::testing::AssertionSuccess();
  }
  ::testing::AssertionResult Noop(std::ostringstream& op) {
    op << "(no-op: file too small)";
    return ::testing::AssertionSuccess();
  }

  std::string path_;
  std::mt19937_64 rng_;
  std::vector<uint8_t> model_;
  uint64_t append_at_ = 0;  // where the last buffered write ended
  UniqueFd bfd_, dfd_;
  std::deque<std::string> history_;
};

// Fixed seeds: a failure reproduces. The backing is pre-filled with 0x5A so
// any stale block that leaks into the file also breaks the comparison.
TEST_P(DataTest, RandomOperationsMatchModel) {
  TempDir dir;
  const std::string backing = dir / "backing.img";
  std::optional<MountedFs> fs;
  if (reference()) {
    fs.emplace();
  } else {
    ASSERT_TRUE(MakePrefilledBacking(backing, 64 * kMiB, kStale));
    fs.emplace(GetParam().ConfigFor(backing));
  }
  ASSERT_TRUE(fs->ok());

  for (uint64_t seed : {1u, 2u}) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    const std::string path = fs->path("model" + std::to_string(seed));
    ModelRun run(path, seed);
    ASSERT_TRUE(run.Open());
    for (int i = 0; i < 200; i++) {
      ASSERT_TRUE(run.Step()) << "operation " << i << "; daemon log:\n" << fs->DaemonLog();
      if (i % 4 == 3) {
        ASSERT_TRUE(run.Check()) << "after operation " << i;
      }
    }
    ASSERT_TRUE(run.Check());
    ASSERT_EQ(run.Fsync(), 0);
    run.Close();
    // The page cache and the device agree, and both survive a remount.
    EXPECT_TRUE(BufferedFileIs(path, run.model()));
    ASSERT_TRUE(fs->Remount());
    EXPECT_TRUE(FileIs(path, run.model())) << "after remount";
    EXPECT_TRUE(BufferedFileIs(path, run.model())) << "after remount";
  }
}

// An unaligned write reuses the partial block the previous one left, instead
// of reading it back; a punch or a truncate in between (block aligned, so
// no partial block of their own is zeroed) must make it read as zeros.
TEST_P(DataTest, UnalignedWriteAfterPunchOrTruncateSeesZeros) {
  MountedFs fs(GetParam().Config());
  ASSERT_TRUE(fs.ok());
  for (const bool punch : {true, false}) {
    SCOPED_TRACE(punch ? "punch" : "truncate");
    const std::string path = fs.path(punch ? "punched" : "truncated");
    UniqueFd fd(open(path.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    std::vector<uint8_t> want(5000, 'a');
    ASSERT_EQ(PwriteFull(fd.get(), want.data(), want.size(), 0), 0);  // leaves block 1 partly written
    if (punch) {
      ASSERT_EQ(fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 4096), 0) << strerror(errno);
    } else {
      ASSERT_EQ(ftruncate(fd.get(), 4096), 0) << strerror(errno);
    }
    std::fill(want.begin() + 4096, want.end(), 0);
    const std::vector<uint8_t> tail(100, 'b');
    ASSERT_EQ(PwriteFull(fd.get(), tail.data(), tail.size(), 5000), 0);  // into block 1 again
    want.insert(want.end(), tail.begin(), tail.end());
    fd.reset();
    EXPECT_TRUE(FileIs(path, want));
    ASSERT_TRUE(fs.Remount());
    EXPECT_TRUE(FileIs(path, want)) << "after remount";
  }
}

// ------------------------------------------------------ SEEK_DATA / SEEK_HOLE

// lseek result: the offset, or -errno.
off_t Seek(int fd, off_t off, int whence) {
  off_t r = lseek(fd, off, whence);
  return r < 0 ? -errno : r;
}

// Buffered appends in pieces (tar's 10 KiB records, log lines) reach deferfs
// as unaligned writes at EOF: the block they share with the last one is kept
// from that write, not read back, and nothing before them needs zeroing.
TEST_P(DataTest, BufferedAppendsReadNothingBack) {
  if (reference()) GTEST_SKIP() << "counts deferfs' device reads";
  MountedFs fs(GetParam().Config());
  ASSERT_TRUE(fs.ok());
  UniqueFd fd = OpenOrFail(fs.path("log"), O_WRONLY | O_APPEND | O_CREAT);
  ASSERT_TRUE(fd.ok());
  const std::string line(100, 'l');
  ASSERT_EQ(write(fd.get(), line.data(), line.size()), 100);  // may read its empty block
  const uint64_t reads = Stats::Read(fs)["dio.reads"];
  for (int i = 0; i < 60; i++) ASSERT_EQ(write(fd.get(), line.data(), line.size()), 100) << "append " << i;
  // The one new block they cross into is asked for once (past EOF: no IO).
  EXPECT_LE(Stats::Read(fs)["dio.reads"], reads + 1) << "appends read their blocks back";
  struct stat st{};
  ASSERT_EQ(fstat(fd.get(), &st), 0);
  EXPECT_EQ(st.st_size, 61 * 100);
}

TEST_P(DataTest, SeekDataAndHoleFollowExt4) {
  std::optional<MountedFs> fs;
  fs.emplace(GetParam().Config());
  ASSERT_TRUE(fs->ok());
  const std::string path = fs->path("sparse");
  constexpr off_t K = 1024;
  {
    // [0,64K) data | [64K,128K) hole | [128K,192K) fallocated, with data at
    // [160K,164K) | [192K,256K) data | [256K,320K) fallocated past the old
    // EOF | [320K,384K) hole; size 384K.
    UniqueFd fd = OpenOrFail(path, O_RDWR | O_CREAT | O_DIRECT);
    ASSERT_TRUE(fd.ok());
    AlignedBuf buf(64 * K);
    std::memset(buf.data(), 0xC3, buf.size());
    ASSERT_EQ(PwriteFull(fd.get(), buf.data(), 64 * K, 0), 0);
    ASSERT_EQ(fallocate(fd.get(), 0, 128 * K, 64 * K), 0) << strerror(errno);
    ASSERT_EQ(PwriteFull(fd.get(), buf.data(), 64 * K, 192 * K), 0);
    ASSERT_EQ(fallocate(fd.get(), FALLOC_FL_KEEP_SIZE, 256 * K, 64 * K), 0) << strerror(errno);
    ASSERT_EQ(ftruncate(fd.get(), 384 * K), 0);
    ASSERT_EQ(PwriteFull(fd.get(), buf.data(), 4 * K, 160 * K), 0);
    ASSERT_EQ(fsync(fd.get()), 0);
  }
  struct Case {
    off_t off;
    int whence;
    off_t want;  // offset, or -errno
  };
  const std::vector<Case> cases = {
      {0, SEEK_DATA, 0},           {100, SEEK_DATA, 100},         {64 * K, SEEK_DATA, 160 * K},
      {128 * K, SEEK_DATA, 160 * K}, {161 * K, SEEK_DATA, 161 * K}, {164 * K, SEEK_DATA, 192 * K},
      {200 * K, SEEK_DATA, 200 * K}, {256 * K, SEEK_DATA, -ENXIO},  {384 * K - 1, SEEK_DATA, -ENXIO},
      {384 * K, SEEK_DATA, -ENXIO},  {1024 * K, SEEK_DATA, -ENXIO}, {0, SEEK_HOLE, 64 * K},
      {64 * K, SEEK_HOLE, 64 * K},   {100 * K, SEEK_HOLE, 100 * K}, {128 * K, SEEK_HOLE, 128 * K},
      {160 * K, SEEK_HOLE, 164 * K}, {192 * K, SEEK_HOLE, 256 * K}, {300 * K, SEEK_HOLE, 300 * K},
      {384 * K - 1, SEEK_HOLE, 384 * K - 1}, {384 * K, SEEK_HOLE, -ENXIO}, {1024 * K, SEEK_HOLE, -ENXIO},
  };
  auto check_all = [&](const char* when) {
    UniqueFd fd = OpenOrFail(path, O_RDONLY);
    ASSERT_TRUE(fd.ok());
    for (const Case& c : cases) {
      EXPECT_EQ(Seek(fd.get(), c.off, c.whence), c.want)
          << when << ": lseek(" << c.off << ", " << (c.whence == SEEK_DATA ? "SEEK_DATA" : "SEEK_HOLE")
          << ") (negative = -errno)";
    }
  };
  check_all("before remount");
  ASSERT_TRUE(fs->Remount());
  check_all("after remount");

  // Edge files: all hole, and empty.
  {
    UniqueFd fd = OpenOrFail(fs->path("allhole"), O_RDWR | O_CREAT);
    ASSERT_EQ(ftruncate(fd.get(), 1024 * K), 0);
    EXPECT_EQ(Seek(fd.get(), 0, SEEK_DATA), -ENXIO);
    EXPECT_EQ(Seek(fd.get(), 0, SEEK_HOLE), 0);
    EXPECT_EQ(Seek(fd.get(), 1000 * K, SEEK_HOLE), 1000 * K);
    UniqueFd e = OpenOrFail(fs->path("empty"), O_RDWR | O_CREAT);
    EXPECT_EQ(Seek(e.get(), 0, SEEK_DATA), -ENXIO);
    EXPECT_EQ(Seek(e.get(), 0, SEEK_HOLE), -ENXIO);
  }
}

// ---------------------------------------------------------------- persistence

TEST_P(DataTest, DataPersistsAcrossRemount) {
  std::optional<MountedFs> fs;
  fs.emplace(GetParam().Config());
  ASSERT_TRUE(fs->ok());
  std::mt19937_64 rng(7);

  // dense: 3 MiB by O_DIRECT plus an unaligned buffered tail; fsynced.
  std::vector<uint8_t> dense = RandomBytes(rng, 3 * kMiB + 1234);
  // sparse: 16 MiB long, 64 KiB of data in the middle; fsynced.
  std::vector<uint8_t> sparse(16 * kMiB, 0);
  std::vector<uint8_t> mid = RandomBytes(rng, 64 * kKiB);
  std::copy(mid.begin(), mid.end(), sparse.begin() + 8 * kMiB);
  // appends: many small buffered appends; no fsync (a clean unmount must keep them).
  std::vector<uint8_t> appends = RandomBytes(rng, 100 * 777);
  // nosync: O_DIRECT writes into a fallocated file, no fsync.
  std::vector<uint8_t> nosync = RandomBytes(rng, 2 * kMiB);
  {
    UniqueFd d = OpenOrFail(fs->path("dense"), O_RDWR | O_CREAT | O_DIRECT);
    UniqueFd b = OpenOrFail(fs->path("dense"), O_RDWR);
    for (uint64_t off = 0; off < 3 * kMiB; off += kMiB) ASSERT_EQ(DirectWrite(d.get(), &dense[off], kMiB, off), 0);
    ASSERT_EQ(PwriteFull(b.get(), &dense[3 * kMiB], 1234, 3 * kMiB), 0);
    ASSERT_EQ(fsync(d.get()), 0);

    UniqueFd s = OpenOrFail(fs->path("sparse"), O_RDWR | O_CREAT | O_DIRECT);
    ASSERT_EQ(ftruncate(s.get(), 16 * kMiB), 0);
    ASSERT_EQ(DirectWrite(s.get(), mid.data(), mid.size(), 8 * kMiB), 0);
    ASSERT_EQ(fdatasync(s.get()), 0);

    UniqueFd a = OpenOrFail(fs->path("appends"), O_WRONLY | O_CREAT | O_APPEND);
    for (size_t i = 0; i < 100; i++) ASSERT_EQ(PwriteFull(a.get(), &appends[i * 777], 777, 0), 0);

    UniqueFd n = OpenOrFail(fs->path("nosync"), O_RDWR | O_CREAT | O_DIRECT);
    ASSERT_EQ(fallocate(n.get(), 0, 0, static_cast<off_t>(nosync.size())), 0) << strerror(errno);
    for (uint64_t off = 0; off < nosync.size(); off += 256 * kKiB) {
      ASSERT_EQ(DirectWrite(n.get(), &nosync[off], 256 * kKiB, off), 0);
    }
  }
  auto blocks = [&](const char* name) {
    struct stat st{};
    EXPECT_EQ(stat(fs->path(name).c_str(), &st), 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  };
  const uint64_t dense_blocks = blocks("dense"), sparse_blocks = blocks("sparse");
  ASSERT_TRUE(fs->Remount());

  EXPECT_TRUE(FileIs(fs->path("dense"), dense));
  EXPECT_TRUE(FileIs(fs->path("sparse"), sparse));
  EXPECT_TRUE(FileIs(fs->path("appends"), appends));
  EXPECT_TRUE(FileIs(fs->path("nosync"), nosync));
  EXPECT_TRUE(BufferedFileIs(fs->path("dense"), dense));
  // st_blocks: the allocated bytes, rounded to blocks; holes cost nothing.
  EXPECT_GE(blocks("dense"), dense.size());
  EXPECT_LE(blocks("dense"), RoundUp(dense.size()) + kMiB);
  EXPECT_GE(blocks("sparse"), mid.size());
  EXPECT_LT(blocks("sparse"), 2 * kMiB) << "a 16 MiB file with 64 KiB of data";
  EXPECT_GE(blocks("nosync"), nosync.size());
  EXPECT_EQ(blocks("dense"), dense_blocks) << "st_blocks changed across the remount";
  EXPECT_EQ(blocks("sparse"), sparse_blocks) << "st_blocks changed across the remount";
}

// ------------------------------------------------------------- stale data

// Each case makes a file and the bytes it must hold; none may show 0x5A.
TEST_P(DataTest, NoStaleDataFromTheDevice) {
  if (reference()) GTEST_SKIP() << "needs a pre-filled deferfs backing";
  TempDir dir;
  const std::string backing = dir / "stale.img";
  ASSERT_TRUE(MakePrefilledBacking(backing, 32 * kMiB, kStale));
  MountedFs fs(GetParam().ConfigFor(backing));
  ASSERT_TRUE(fs.ok());
  std::mt19937_64 rng(11);
  std::map<std::string, std::vector<uint8_t>> want;

  {  // Growth by ftruncate: all hole.
    UniqueFd fd = OpenOrFail(fs.path("truncated"), O_RDWR | O_CREAT);
    ASSERT_EQ(ftruncate(fd.get(), 1 * kMiB + 123), 0);
    want["truncated"].assign(kMiB + 123, 0);
  }
  {  // fallocate(0), and KEEP_SIZE past EOF made visible by ftruncate.
    UniqueFd fd = OpenOrFail(fs.path("fallocated"), O_RDWR | O_CREAT);
    ASSERT_EQ(fallocate(fd.get(), 0, 0, 1 * kMiB), 0) << strerror(errno);
    ASSERT_EQ(fallocate(fd.get(), FALLOC_FL_KEEP_SIZE, 1 * kMiB, 1 * kMiB), 0) << strerror(errno);
    ASSERT_EQ(ftruncate(fd.get(), 2 * kMiB), 0);
    want["fallocated"].assign(2 * kMiB, 0);
  }
  {  // Partial-block writes into fresh blocks, and growth past EOF by a write.
    UniqueFd fd = OpenOrFail(fs.path("partial"), O_RDWR | O_CREAT);
    auto& w = want["partial"];
    auto put = [&](uint64_t off, size_t len) {
      std::vector<uint8_t> d = RandomBytes(rng, len, kStale);
      ASSERT_EQ(PwriteFull(fd.get(), d.data(), len, static_cast<off_t>(off)), 0);
      if (w.size() < off + len) w.resize(off + len, 0);
      std::copy(d.begin(), d.end(), w.begin() + off);
    };
    put(5000, 100);          // middle of the second block, file was empty
    put(3 * kMiB + 1, 10);   // far past EOF: the gap is a hole
    put(3 * kMiB + 9000, 1); // a block after that, past EOF again
    ASSERT_EQ(ftruncate(fd.get(), static_cast<off_t>(w.size() + 7000)), 0);  // tail of a written block
    w.resize(w.size() + 7000, 0);
  }
  {  // Partial-block writes into fallocated (unwritten) blocks.
    UniqueFd fd = OpenOrFail(fs.path("unwritten"), O_RDWR | O_CREAT);
    ASSERT_EQ(fallocate(fd.get(), 0, 0, 256 * kKiB), 0) << strerror(errno);
    auto& w = want["unwritten"];
    w.assign(256 * kKiB, 0);
    std::vector<uint8_t> d = RandomBytes(rng, 10, kStale);
    ASSERT_EQ(PwriteFull(fd.get(), d.data(), d.size(), 4096 + 7), 0);
    std::copy(d.begin(), d.end(), w.begin() + 4096 + 7);
  }
  {  // Written, then punched, zeroed, shrunk to an unaligned size and regrown.
    UniqueFd fd = OpenOrFail(fs.path("punched"), O_RDWR | O_CREAT | O_DIRECT);
    auto& w = want["punched"];
    w = RandomBytes(rng, 256 * kKiB, kStale);
    ASSERT_EQ(DirectWrite(fd.get(), w.data(), w.size(), 0), 0);
    ASSERT_EQ(fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10000, 90000), 0) << strerror(errno);
    std::fill(w.begin() + 10000, w.begin() + 100000, 0);
    ASSERT_EQ(fallocate(fd.get(), FALLOC_FL_ZERO_RANGE, 150000, 10000), 0) << strerror(errno);
    std::fill(w.begin() + 150000, w.begin() + 160000, 0);
    ASSERT_EQ(ftruncate(fd.get(), 200001), 0);
    ASSERT_EQ(ftruncate(fd.get(), 256 * kKiB), 0);
    std::fill(w.begin() + 200001, w.end(), 0);
  }
  {  // Blocks of a deleted file, reused by a new one, read as zeros.
    std::vector<uint8_t> old(8 * kMiB, 0x33);
    UniqueFd fd = OpenOrFail(fs.path("deleted"), O_RDWR | O_CREAT | O_DIRECT);
    ASSERT_EQ(DirectWrite(fd.get(), old.data(), old.size(), 0), 0);
    fd.reset();
    ASSERT_EQ(unlink(fs.path("deleted").c_str()), 0);
    ASSERT_NO_FATAL_FAILURE(SyncFs(fs.path("")));
    // All free space but 1 MiB: the deleted file's blocks must be among it.
    struct statvfs sv = StatVfs(fs.path(""));
    const uint64_t len = RoundDown(sv.f_bavail * sv.f_frsize - kMiB);
    ASSERT_GT(len, old.size());
    UniqueFd n = OpenOrFail(fs.path("reused"), O_RDWR | O_CREAT);
    ASSERT_EQ(fallocate(n.get(), 0, 0, static_cast<off_t>(len)), 0) << strerror(errno);
    want["reused"].assign(len, 0);
  }

  auto check = [&](const char* when) {
    for (const auto& [name, bytes] : want) {
      EXPECT_TRUE(NoStaleBytes(fs.path(name))) << when;
      EXPECT_TRUE(FileIs(fs.path(name), bytes)) << when;
      EXPECT_TRUE(BufferedFileIs(fs.path(name), bytes)) << when;
    }
  };
  check("before remount");
  ASSERT_TRUE(fs.Remount());
  check("after remount");
}

// ------------------------------------------------------------------ ENOSPC

TEST_P(DataTest, EnospcLeavesTheFileSystemUsable) {
  if (reference()) GTEST_SKIP() << "needs a small deferfs";
  MountedFs fs(GetParam().Config(32 * kMiB));
  ASSERT_TRUE(fs.ok());
  std::mt19937_64 rng(3);
  const std::string root = fs.path("");

  const std::vector<uint8_t> keep = RandomBytes(rng, 2 * kMiB);
  {
    UniqueFd fd = OpenOrFail(fs.path("keep"), O_RDWR | O_CREAT | O_DIRECT);
    ASSERT_EQ(DirectWrite(fd.get(), keep.data(), keep.size(), 0), 0);
    ASSERT_EQ(fsync(fd.get()), 0);
  }

  // Fill: 1 MiB O_DIRECT writes, then 4 KiB ones, until ENOSPC.
  std::vector<uint8_t> fill;
  {
    UniqueFd fd = OpenOrFail(fs.path("fill"), O_RDWR | O_CREAT | O_DIRECT);
    ASSERT_TRUE(fd.ok());
    int err = 0;
    for (size_t chunk : {size_t{kMiB}, size_t{kBlock}}) {
      AlignedBuf buf(chunk);
      for (int i = 0; i < 2048 && err == 0; i++) {  // bounded: 32 MiB of device at most
        FillRandom(rng, buf.data(), chunk);
        size_t done = 0;
        err = PwriteFull(fd.get(), buf.data(), chunk, static_cast<off_t>(fill.size()), &done);
        fill.insert(fill.end(), buf.data(), buf.data() + done);
      }
      ASSERT_EQ(err, ENOSPC) << "writing " << chunk << "-byte chunks at " << fill.size() << ": "
                             << (err ? strerror(err) : "never failed") << "\n"
                             << fs.DaemonLog();
      err = 0;
    }
    // A buffered write and an allocating fallocate fail the same way.
    UniqueFd b = OpenOrFail(fs.path("fill"), O_RDWR);
    char c = 'x';
    EXPECT_EQ(Err(pwrite(b.get(), &c, 1, static_cast<off_t>(fill.size() + 3 * kBlock))), ENOSPC);
    EXPECT_EQ(Err(fallocate(b.get(), 0, static_cast<off_t>(fill.size() + kMiB), kMiB)), ENOSPC);
  }
  struct statvfs sv = StatVfs(root);
  EXPECT_LT(sv.f_bavail * sv.f_frsize, 64 * kKiB) << "free space after ENOSPC";
  EXPECT_GT(fill.size(), 20 * kMiB) << "a 32 MiB device should hold more";

  // What was reported written is there, nothing else.
  struct stat st{};
  ASSERT_EQ(stat(fs.path("fill").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), fill.size()) << "failed writes must not change the size";
  EXPECT_TRUE(FileIs(fs.path("fill"), fill));
  EXPECT_TRUE(FileIs(fs.path("keep"), keep));

  // Deleting frees the space when the kernel forgets the inode, just after
  // the unlink returned (its forget is queued beside the next requests).
  ASSERT_EQ(unlink(fs.path("fill").c_str()), 0);
  ASSERT_NO_FATAL_FAILURE(SyncFs(root));
  EXPECT_TRUE(WaitUntil([&] {
    struct statvfs now = StatVfs(root);
    return now.f_bavail * now.f_frsize >= fill.size() - 64 * kKiB;
  })) << "unlink did not free the space";
  const std::vector<uint8_t> after = RandomBytes(rng, 8 * kMiB);
  {
    UniqueFd fd = OpenOrFail(fs.path("after"), O_RDWR | O_CREAT | O_DIRECT);
    ASSERT_EQ(DirectWrite(fd.get(), after.data(), after.size(), 0), 0) << "write after freeing space";
    UniqueFd b = OpenOrFail(fs.path("after"), O_RDWR);
    ASSERT_EQ(PwriteFull(b.get(), "tail", 4, static_cast<off_t>(after.size())), 0);
    ASSERT_EQ(fsync(fd.get()), 0);
  }
  std::vector<uint8_t> after_want = after;
  after_want.insert(after_want.end(), {'t', 'a', 'i', 'l'});

  ASSERT_TRUE(fs.Remount());
  EXPECT_TRUE(FileIs(fs.path("keep"), keep)) << "after remount";
  EXPECT_TRUE(FileIs(fs.path("after"), after_want)) << "after remount";
  sv = StatVfs(root);
  const uint64_t used = (sv.f_blocks - sv.f_bfree) * sv.f_frsize;
  EXPECT_GE(used, keep.size() + after_want.size());
  EXPECT_LE(used, keep.size() + after_want.size() + kMiB) << "space leaked across the remount";
}

// The shakedown's scenarios through the kernel: a truncate to the same size
// frees a KEEP_SIZE preallocation past EOF (as ext4), and a fallocate larger
// than the free space fails keeping nothing; fsck finds the store clean.
TEST(PreallocationTest, TruncateFreesItAndEnospcKeepsNone) {
  MountConfig cfg;
  cfg.size = 32 * kMiB;
  MountedFs fs(cfg);
  ASSERT_TRUE(fs.ok());
  auto blocks = [](const std::string& p) {
    struct stat st{};
    EXPECT_EQ(stat(p.c_str(), &st), 0) << p << ": " << strerror(errno);
    return static_cast<uint64_t>(st.st_blocks);
  };
  const std::string k = fs.path("k");
  {
    UniqueFd fd = OpenOrFail(k, O_RDWR | O_CREAT);
    ASSERT_EQ(PwriteFull(fd.get(), "hello", 5, 0), 0);
    ASSERT_EQ(fallocate(fd.get(), FALLOC_FL_KEEP_SIZE, 0, 8 * kMiB), 0) << strerror(errno);
  }
  EXPECT_EQ(blocks(k), 8 * kMiB / 512);
  ASSERT_EQ(truncate(k.c_str(), 5), 0) << strerror(errno);
  EXPECT_EQ(blocks(k), kBlock / 512) << "the preallocation past EOF stayed";
  EXPECT_TRUE(BufferedFileIs(k, {'h', 'e', 'l', 'l', 'o'}));
  if (fs.reference_mode()) return;  // the rest needs a small deferfs

  const uint64_t free0 = StatVfs(fs.path("")).f_bfree;
  {
    UniqueFd fd = OpenOrFail(fs.path("fa"), O_RDWR | O_CREAT);
    EXPECT_EQ(Err(fallocate(fd.get(), 0, 0, 100 * kMiB)), ENOSPC);
  }
  EXPECT_EQ(blocks(fs.path("fa")), 0u) << "the failed fallocate kept blocks";
  EXPECT_EQ(StatVfs(fs.path("")).f_bfree, free0) << "the failed fallocate kept space";
  ASSERT_TRUE(fs.Unmount());
  RunResult fsck = RunDeferfs({"fsck", fs.backing()});
  EXPECT_TRUE(fsck.succeeded()) << fsck.Describe();
}

// -------------------------------------------------- unlink of an open file

TEST_P(DataTest, UnlinkedOpenFileIsFreedAtLastClose) {
  std::optional<MountedFs> fs;
  fs.emplace(GetParam().Config());
  ASSERT_TRUE(fs->ok());
  const std::string root = fs->path("");
  const uint64_t data_blocks = 8 * kMiB / kBlock;
  std::mt19937_64 rng(5);
  const std::vector<uint8_t> data = RandomBytes(rng, 8 * kMiB);

  const uint64_t free0 = StatVfs(root).f_bfree * StatVfs(root).f_frsize / kBlock;
  UniqueFd w = OpenOrFail(fs->path("victim"), O_RDWR | O_CREAT | O_DIRECT);
  ASSERT_EQ(DirectWrite(w.get(), data.data(), data.size(), 0), 0);
  ASSERT_EQ(fsync(w.get()), 0);
  UniqueFd r = OpenOrFail(fs->path("victim"), O_RDONLY);
  auto free_blocks = [&] {
    struct statvfs sv = StatVfs(root);
    return sv.f_bfree * sv.f_frsize / kBlock;
  };
  ASSERT_LE(free_blocks() + data_blocks, free0 + 64) << "writing 8 MiB did not use the space";

  ASSERT_EQ(unlink(fs->path("victim").c_str()), 0);
  ASSERT_NO_FATAL_FAILURE(SyncFs(root));
  struct stat st{};
  EXPECT_EQ(Err(stat(fs->path("victim").c_str(), &st)), ENOENT);
  // Still open: data readable and writable, blocks still in use.
  std::vector<uint8_t> got(data.size());
  EXPECT_EQ(PreadUpTo(r.get(), got.data(), got.size(), 0), static_cast<ssize_t>(data.size()));
  EXPECT_TRUE(SameBytes(data, got)) << "reading the unlinked file";
  EXPECT_EQ(DirectWrite(w.get(), data.data(), kMiB, 8 * kMiB), 0) << "writing the unlinked file";
  EXPECT_LE(free_blocks() + data_blocks, free0 + 64) << "blocks freed while the file is still open";

  w.reset();
  r.reset();
  // The release reaches the daemon asynchronously: wait (bounded) for it.
  bool freed = WaitUntil(
      [&] {
        UniqueFd d(open(root.c_str(), O_RDONLY | O_CLOEXEC));
        if (d.ok()) syncfs(d.get());
        return free_blocks() + 64 >= free0;
      },
      20s);
  EXPECT_TRUE(freed) << "blocks not freed after the last close: free " << free_blocks() << ", before " << free0;
  ASSERT_TRUE(fs->Remount());
  EXPECT_GE(free_blocks() + 64, free0) << "after remount";
}

// ------------------------------------------------------------ instantiation

INSTANTIATE_TEST_SUITE_P(Modes, DataFioTest, ::testing::ValuesIn(EveryMode(2, 1, 1)), VariantName());
INSTANTIATE_TEST_SUITE_P(Modes, DataTest, ::testing::ValuesIn(EveryMode(2, 1, 1)), VariantName());
INSTANTIATE_TEST_SUITE_P(OneOfEach, DataTest, ::testing::ValuesIn(EveryMode(1, 1, 1)), VariantName());
INSTANTIATE_TEST_SUITE_P(Wide, DataTest, ::testing::ValuesIn(EveryMode(4, 2, 2)), VariantName());

}  // namespace
}  // namespace deferfs_test
