// Faults on a real mount: device IO failed by `-o fault_inject` (tags of
// backend/fault_inject.h in the data) in every completion mode, a full
// device whose freed space is usable at once, and a metadata store that runs
// out of space (its directory on a small tmpfs), which must shut the
// filesystem down rather than let it diverge from the device.
#include <fcntl.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/fault_inject.h"
#include "tests/mount/io_helpers.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using deferfs::kFaultEioRead;
using deferfs::kFaultEioWrite;
using deferfs::kFaultShortRead;
using deferfs::kFaultShortWrite;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kBlock = 4096;

bool Reference() {
  const char* d = getenv("DEFERFS_TEST_DIR");
  return d != nullptr && *d != '\0';
}

UniqueFd OpenOrFail(const std::string& path, int flags, mode_t mode = 0644) {
  UniqueFd fd(open(path.c_str(), flags | O_CLOEXEC, mode));
  if (!fd.ok()) ADD_FAILURE() << "open " << path << ": " << strerror(errno);
  return fd;
}

// `blocks` 4 KiB blocks of random bytes (seeded), aligned for O_DIRECT;
// `tags` puts a fault tag at the start of the given blocks.
struct Data {
  AlignedBuf buf;
  Data(size_t blocks, uint64_t seed) : buf(blocks * kBlock) {
    std::mt19937_64 rng(seed);
    FillRandom(rng, buf.data(), buf.size(), 0);
  }
  template <size_t N>
  Data& Tag(size_t block, const char (&tag)[N]) {
    std::memcpy(buf.data() + block * kBlock, tag, N);
    return *this;
  }
  std::vector<uint8_t> bytes() const { return std::vector<uint8_t>(buf.data(), buf.data() + buf.size()); }
};

// errno of an O_DIRECT pwrite/pread of the whole buffer (0: all of it moved).
int DirectPwrite(int fd, const Data& d, uint64_t off) {
  ssize_t r = pwrite(fd, d.buf.data(), d.buf.size(), static_cast<off_t>(off));
  return r < 0 ? errno : static_cast<size_t>(r) == d.buf.size() ? 0 : EIO;
}

// Reads `len` bytes at `off` through an O_DIRECT descriptor: errno, data in *out.
int DirectPread(int fd, uint64_t off, size_t len, std::vector<uint8_t>* out) {
  AlignedBuf buf(len);
  ssize_t r = pread(fd, buf.data(), len, static_cast<off_t>(off));
  if (r < 0) return errno;
  out->assign(buf.data(), buf.data() + r);
  return 0;
}

std::vector<uint8_t> Zeros(size_t n) { return std::vector<uint8_t>(n, 0); }

std::vector<uint8_t> Slice(const std::vector<uint8_t>& v, size_t off, size_t len) {
  return std::vector<uint8_t>(v.begin() + static_cast<ptrdiff_t>(off), v.begin() + static_cast<ptrdiff_t>(off + len));
}

class FaultTest : public ::testing::TestWithParam<MountVariant> {
 protected:
  void SetUp() override {
    if (Reference()) GTEST_SKIP() << "injected faults need deferfs";
  }
  MountConfig Config() const {
    MountConfig c = GetParam().Config();
    c.options.push_back("fault_inject");
    return c;
  }
};

// ------------------------------------------------------------ device faults

TEST_P(FaultTest, TaggedRequestsFailAloneAndTheDaemonServesOn) {
  MountedFs fs(Config());
  ASSERT_TRUE(fs.ok());
  const std::string f = fs.path("f");
  UniqueFd fd = OpenOrFail(f, O_RDWR | O_CREAT | O_DIRECT);
  ASSERT_TRUE(fd.ok());
  Data old(16, 1);
  old.Tag(5, kFaultEioRead).Tag(9, kFaultShortRead);  // read tags: this write succeeds
  ASSERT_EQ(DirectPwrite(fd.get(), old, 0), 0);
  ASSERT_EQ(fsync(fd.get()), 0);

  // Writes: tagged ones fail with EIO, overwrites and allocations alike.
  EXPECT_EQ(DirectPwrite(fd.get(), Data(1, 2).Tag(0, kFaultEioWrite), 20 * kBlock), EIO) << "allocating";
  EXPECT_EQ(DirectPwrite(fd.get(), Data(1, 3).Tag(0, kFaultShortWrite), 3 * kBlock), EIO) << "overwrite";
  EXPECT_EQ(DirectPwrite(fd.get(), Data(8, 4).Tag(4, kFaultEioWrite), 30 * kBlock), EIO) << "8 blocks, 5th tagged";
  EXPECT_EQ(DirectPwrite(fd.get(), Data(2, 5).Tag(1, kFaultShortWrite), 24 * kBlock), EIO) << "allocating short";
  Data n2(1, 6), n21(1, 7);
  EXPECT_EQ(DirectPwrite(fd.get(), n2, 2 * kBlock), 0) << "neighbour overwrite";
  EXPECT_EQ(DirectPwrite(fd.get(), n21, 21 * kBlock), 0) << "neighbour allocation";

  // The file: old data under failed overwrites, holes where allocating
  // writes failed, and the size set by the successful ones only.
  std::vector<uint8_t> want = old.bytes();
  want.resize(22 * kBlock, 0);
  std::copy(n2.buf.data(), n2.buf.data() + kBlock, want.begin() + 2 * kBlock);
  std::copy(n21.buf.data(), n21.buf.data() + kBlock, want.begin() + 21 * kBlock);
  struct stat st{};
  ASSERT_EQ(fstat(fd.get(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), want.size());
  std::vector<uint8_t> got;
  for (uint64_t b : {0, 1, 2, 3, 4, 6, 7, 8, 10, 15, 16, 20, 21}) {
    ASSERT_EQ(DirectPread(fd.get(), b * kBlock, kBlock, &got), 0) << "block " << b;
    EXPECT_TRUE(SameBytes(Slice(want, b * kBlock, kBlock), got)) << "block " << b;
  }

  // Reads: a read-tagged block fails every read covering it, O_DIRECT or not.
  EXPECT_EQ(DirectPread(fd.get(), 5 * kBlock, kBlock, &got), EIO);
  EXPECT_EQ(DirectPread(fd.get(), 9 * kBlock, kBlock, &got), EIO) << "short read";
  EXPECT_EQ(DirectPread(fd.get(), 0, 16 * kBlock, &got), EIO) << "a read spanning the tagged blocks";
  {
    UniqueFd buffered = OpenOrFail(f, O_RDONLY);
    char c;
    EXPECT_EQ(Err(pread(buffered.get(), &c, 1, 5 * kBlock + 17)), EIO) << "buffered read";
  }

  // The daemon serves on: a new file, written, synced and read back.
  {
    UniqueFd g = OpenOrFail(fs.path("g"), O_RDWR | O_CREAT | O_DIRECT);
    Data d(64, 8);
    ASSERT_EQ(DirectPwrite(g.get(), d, 0), 0);
    ASSERT_EQ(fsync(g.get()), 0);
    ASSERT_EQ(DirectPread(g.get(), 0, d.buf.size(), &got), 0);
    EXPECT_TRUE(SameBytes(d.bytes(), got));
  }
  // 4 failed writes, at least 3 failed reads (the kernel may retry a buffered one).
  EXPECT_GE(Stats::Read(fs)["dio.errors"], 7u);
  fd.reset();

  // A remount sees the same file: nothing of the failed writes was committed.
  ASSERT_TRUE(fs.Remount());
  fd = OpenOrFail(f, O_RDONLY | O_DIRECT);
  ASSERT_EQ(fstat(fd.get(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), want.size());
  for (uint64_t b : {2, 3, 20, 21}) {
    ASSERT_EQ(DirectPread(fd.get(), b * kBlock, kBlock, &got), 0) << "block " << b;
    EXPECT_TRUE(SameBytes(Slice(want, b * kBlock, kBlock), got)) << "block " << b << " after remount";
  }
}

// A write that fails after one of its bios landed leaves that bio's data on
// the device, also past EOF in the file's partial last block, where the size
// did not move. Whatever grows the file later (a truncate, a write beyond,
// an unaligned write beyond, a fallocate) must show zeros there, not it.
TEST_P(FaultTest, GrowingAFileShowsZerosWhereAFailedWriteLandedPastItsEnd) {
  MountedFs fs(Config());
  ASSERT_TRUE(fs.ok());
  const std::string head(100, 'h');
  auto grow = std::vector<std::pair<std::string, std::function<int(int)>>>{
      {"truncate", [](int fd) { return ftruncate(fd, 3 * kBlock) == 0 ? 0 : errno; }},
      {"aligned write beyond", [](int fd) { return DirectPwrite(fd, Data(1, 11), 2 * kBlock); }},
      {"unaligned write beyond", [](int fd) { return pwrite(fd, "t", 1, 2 * kBlock + 7) == 1 ? 0 : errno; }},
      {"fallocate", [](int fd) { return fallocate(fd, 0, 0, 3 * kBlock) == 0 ? 0 : errno; }},
  };
  int i = 0;
  for (const auto& [what, op] : grow) {
    SCOPED_TRACE(what);
    const std::string f = fs.path("f" + std::to_string(i++));
    {
      UniqueFd fd = OpenOrFail(f, O_RDWR | O_CREAT);
      ASSERT_EQ(pwrite(fd.get(), head.data(), head.size(), 0), 100);  // block 0 written, size 100
      ASSERT_EQ(fsync(fd.get()), 0);
    }
    UniqueFd fd = OpenOrFail(f, O_RDWR | O_DIRECT);
    // Block 0 is mapped, so its bio is its own and lands; block 1's fails.
    ASSERT_EQ(DirectPwrite(fd.get(), Data(2, 10).Tag(1, kFaultEioWrite), 0), EIO);
    struct stat st{};
    ASSERT_EQ(fstat(fd.get(), &st), 0);
    ASSERT_EQ(st.st_size, 100) << "the failed write moved the size";
    ASSERT_EQ(op(fd.get()), 0);
    std::vector<uint8_t> got;
    ASSERT_EQ(DirectPread(fd.get(), 0, kBlock, &got), 0);
    ASSERT_EQ(got.size(), kBlock);
    EXPECT_TRUE(SameBytes(Zeros(kBlock - 100), Slice(got, 100, kBlock - 100)))
        << "the failed write's bytes show past the old end of file";
  }
}

// io_uring at queue depth 16: exactly the tagged requests of a batch fail.
TEST_P(FaultTest, IoUringBatchFailsExactlyTheTaggedRequests) {
  MountedFs fs(Config());
  ASSERT_TRUE(fs.ok());
  UniqueFd fd = OpenOrFail(fs.path("f"), O_RDWR | O_CREAT | O_DIRECT);
  ASSERT_TRUE(fd.ok());
  constexpr unsigned kDepth = 16;
  struct io_uring ring;
  ASSERT_EQ(io_uring_queue_init(2 * kDepth, &ring, 0), 0);
  struct RingGuard {
    io_uring* r;
    ~RingGuard() { io_uring_queue_exit(r); }
  } guard{&ring};

  // Runs one batch: request i moves block 2*i (writes allocate: every other
  // block stays a hole). Returns each request's result, by index.
  auto batch = [&](bool write, std::vector<Data>& bufs) {
    for (unsigned i = 0; i < kDepth; i++) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring);
      const off_t off = static_cast<off_t>(2 * i * kBlock);
      if (write) io_uring_prep_write(sqe, fd.get(), bufs[i].buf.data(), kBlock, off);
      else io_uring_prep_read(sqe, fd.get(), bufs[i].buf.data(), kBlock, off);
      io_uring_sqe_set_data64(sqe, i);
    }
    std::vector<int> res(kDepth, INT32_MIN);
    EXPECT_EQ(io_uring_submit(&ring), static_cast<int>(kDepth));
    for (unsigned n = 0; n < kDepth; n++) {
      io_uring_cqe* cqe = nullptr;
      if (io_uring_wait_cqe(&ring, &cqe) != 0) {
        ADD_FAILURE() << "io_uring_wait_cqe";
        break;
      }
      const uint64_t i = io_uring_cqe_get_data64(cqe);
      if (i < kDepth) {
        EXPECT_EQ(res[i], INT32_MIN) << "request " << i << " completed twice";
        res[i] = cqe->res;
      }
      io_uring_cqe_seen(&ring, cqe);
    }
    return res;
  };

  // One tag per request: i%4 == 0 none; 1 EIO-WRITE; i%8 == 3 SHORT-WRITE;
  // 2 EIO-READ; i%8 == 7 SHORT-READ (read tags are written, then fail the reads).
  auto fails_write = [](unsigned i) { return i % 4 == 1 || i % 8 == 3; };
  auto fails_read = [](unsigned i) { return i % 4 == 2 || i % 8 == 7; };
  std::vector<Data> wbufs;
  for (unsigned i = 0; i < kDepth; i++) {
    wbufs.emplace_back(1, 100 + i);
    if (i % 4 == 1) wbufs[i].Tag(0, kFaultEioWrite);
    if (i % 8 == 3) wbufs[i].Tag(0, kFaultShortWrite);
    if (i % 4 == 2) wbufs[i].Tag(0, kFaultEioRead);
    if (i % 8 == 7) wbufs[i].Tag(0, kFaultShortRead);
  }
  std::vector<int> wres = batch(true, wbufs);
  for (unsigned i = 0; i < kDepth; i++) {
    EXPECT_EQ(wres[i], fails_write(i) ? -EIO : static_cast<int>(kBlock)) << "write " << i;
  }

  std::vector<Data> rbufs;
  for (unsigned i = 0; i < kDepth; i++) rbufs.emplace_back(1, 200 + i);
  std::vector<int> rres = batch(false, rbufs);
  // Request 15 wrote the last block, so every read is inside the file.
  for (unsigned i = 0; i < kDepth; i++) {
    if (fails_read(i)) {
      EXPECT_EQ(rres[i], -EIO) << "read " << i << " of a read-tagged block";
      continue;
    }
    ASSERT_EQ(rres[i], static_cast<int>(kBlock)) << "read " << i;
    std::vector<uint8_t> got(rbufs[i].buf.data(), rbufs[i].buf.data() + kBlock);
    EXPECT_TRUE(SameBytes(fails_write(i) ? Zeros(kBlock) : wbufs[i].bytes(), got)) << "read " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, FaultTest, ::testing::ValuesIn(EveryMode(2, 1, 1)), VariantName());

// ------------------------------------------------------------- full device

// One worker: the kernel sends a file's RELEASE asynchronously, and a
// single worker takes it before an unlink issued after the close (so the
// unlink, not a later release, frees the blocks).
class FullDeviceTest : public FaultTest {};

TEST_P(FullDeviceTest, SpaceFreedByPunchOrUnlinkIsUsableAtOnce) {
  MountConfig cfg = GetParam().Config(32 * kMiB);
  MountedFs fs(cfg);
  ASSERT_TRUE(fs.ok());
  UniqueFd fill = OpenOrFail(fs.path("fill"), O_RDWR | O_CREAT | O_DIRECT);
  ASSERT_TRUE(fill.ok());
  uint64_t size = 0;
  int err = 0;
  for (size_t blocks : {size_t{256}, size_t{1}}) {
    Data d(blocks, blocks);
    for (int i = 0; i < 4096 && (err = DirectPwrite(fill.get(), d, size)) == 0; i++) size += d.buf.size();
    ASSERT_EQ(err, ENOSPC) << "filling with " << blocks << "-block writes at " << size;
  }
  UniqueFd b = OpenOrFail(fs.path("b"), O_RDWR | O_CREAT | O_DIRECT);
  Data mib(256, 7);
  EXPECT_EQ(DirectPwrite(b.get(), mib, 0), ENOSPC);

  // No syncfs, no fsync in between: the freed space is there at once.
  ASSERT_EQ(fallocate(fill.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kMiB), 0) << strerror(errno);
  EXPECT_EQ(DirectPwrite(b.get(), mib, 0), 0) << "space freed by punch";
  fill.reset();
  auto free_bytes = [&] {
    struct statvfs sv = StatVfs(fs.root());
    return sv.f_bavail * sv.f_frsize;
  };
  const uint64_t before_unlink = free_bytes();
  ASSERT_EQ(unlink(fs.path("fill").c_str()), 0);
  // The blocks come back when the kernel forgets the inode, just after.
  ASSERT_TRUE(WaitUntil([&] { return free_bytes() > before_unlink + 4 * kMiB; }));
  Data more(1024, 8);
  EXPECT_EQ(DirectPwrite(b.get(), more, kMiB), 0) << "space freed by unlink";
  {
    UniqueFd buffered = OpenOrFail(fs.path("b"), O_RDWR);
    EXPECT_EQ(PwriteFull(buffered.get(), "tail", 4, static_cast<off_t>(5 * kMiB + 3)), 0) << "buffered write";
  }
  ASSERT_EQ(fsync(b.get()), 0);
  b.reset();

  std::vector<uint8_t> want = mib.bytes();
  std::vector<uint8_t> m = more.bytes();
  want.insert(want.end(), m.begin(), m.end());
  want.resize(5 * kMiB + 7, 0);
  std::memcpy(want.data() + 5 * kMiB + 3, "tail", 4);
  ASSERT_TRUE(fs.Remount());
  bool ok = false;
  std::vector<uint8_t> got = ReadAllDirect(fs.path("b"), &ok);
  ASSERT_TRUE(ok);
  EXPECT_TRUE(SameBytes(want, got)) << "after remount";
}

std::vector<MountVariant> OneWorkerModes() { return EveryMode(1, 1, 1); }
INSTANTIATE_TEST_SUITE_P(Modes, FullDeviceTest, ::testing::ValuesIn(OneWorkerModes()), VariantName());

// ------------------------------------------------------- metadata failure

// A tmpfs of `size` mounted on a fresh directory, unmounted (and the
// directory removed) on destruction.
class Tmpfs {
 public:
  Tmpfs(const std::string& dir, const std::string& size) : dir_(dir) {
    if (mkdir(dir.c_str(), 0700) != 0) {
      ADD_FAILURE() << "mkdir " << dir << ": " << strerror(errno);
      return;
    }
    if (mount("tmpfs", dir.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, ("size=" + size).c_str()) != 0) {
      ADD_FAILURE() << "mount -t tmpfs " << dir << ": " << strerror(errno);
      rmdir(dir.c_str());
      return;
    }
    mounted_ = true;
  }
  ~Tmpfs() {
    if (mounted_ && umount2(dir_.c_str(), 0) != 0) {
      ADD_FAILURE() << "umount " << dir_ << ": " << strerror(errno) << " (detaching)";
      umount2(dir_.c_str(), MNT_DETACH);
    }
    rmdir(dir_.c_str());
  }
  Tmpfs(const Tmpfs&) = delete;
  Tmpfs& operator=(const Tmpfs&) = delete;
  bool ok() const { return mounted_; }

 private:
  std::string dir_;
  bool mounted_ = false;
};

// Fills the filesystem holding `path` with one file; ENOSPC ends it.
bool FillUp(const std::string& path) {
  UniqueFd fd(open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd.ok()) return false;
  std::vector<char> chunk(64 << 10, 'x');
  for (size_t len : {chunk.size(), size_t{1}}) {
    for (;;) {
      ssize_t r = write(fd.get(), chunk.data(), len);
      if (r < 0 && errno == ENOSPC) break;
      if (r <= 0) return false;
    }
  }
  return true;
}

class MetaFailureTest : public FaultTest {};

TEST_P(MetaFailureTest, FailedMetadataShutsTheFilesystemDown) {
  TempDir dir;
  Tmpfs tmpfs(dir / "metafs", "4m");
  ASSERT_TRUE(tmpfs.ok());
  MountConfig cfg = GetParam().Config();
  cfg.meta = dir / "metafs/meta";
  std::optional<MountedFs> fs;
  fs.emplace(cfg);
  ASSERT_TRUE(fs->ok());

  // Durable data from before the failure.
  Data keep(64, 1);
  {
    UniqueFd fd = OpenOrFail(fs->path("keep"), O_RDWR | O_CREAT | O_DIRECT);
    ASSERT_EQ(DirectPwrite(fd.get(), keep, 0), 0);
    ASSERT_EQ(fsync(fd.get()), 0);
  }
  ASSERT_EQ(mkdir(fs->path("dir").c_str(), 0755), 0);
  UniqueFd sync_dir = OpenOrFail(fs->path(""), O_RDONLY);
  ASSERT_EQ(syncfs(sync_dir.get()), 0);

  // The store's filesystem is full: metadata writes now fail, at the latest
  // when a sync pushes them out.
  ASSERT_TRUE(FillUp(dir / "metafs/filler")) << strerror(errno);
  std::vector<std::string> synced;  // files fully written and fsynced before the failure
  int first_err = 0;
  std::string failed_at;
  for (int i = 0; i < 2000 && first_err == 0; i++) {
    const std::string name = "n" + std::to_string(i);
    UniqueFd fd(open(fs->path(name).c_str(), O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0644));
    if (!fd.ok()) {
      first_err = errno;
      failed_at = "create " + name;
      break;
    }
    if ((first_err = DirectPwrite(fd.get(), Data(1, 1000 + i), 0)) != 0) {
      failed_at = "write " + name;
    } else if (fsync(fd.get()) != 0) {
      first_err = errno;
      failed_at = "fsync " + name;
    } else {
      synced.push_back(name);
    }
  }
  ASSERT_EQ(first_err, EIO) << "metadata writes never failed (or not with EIO): " << failed_at << "\n"
                            << fs->DaemonLog();

  // Shut down: every change fails with EIO.
  {
    UniqueFd fd = OpenOrFail(fs->path("keep"), O_RDWR | O_DIRECT);
    EXPECT_EQ(DirectPwrite(fd.get(), Data(1, 2), 0), EIO) << "overwrite";
    EXPECT_EQ(DirectPwrite(fd.get(), Data(1, 3), 100 * kBlock), EIO) << "allocating write";
    EXPECT_EQ(Err(fsync(fd.get())), EIO) << "fsync";
    EXPECT_EQ(Err(ftruncate(fd.get(), kBlock)), EIO) << "truncate";
    EXPECT_EQ(Err(fallocate(fd.get(), 0, 0, static_cast<off_t>(kMiB))), EIO) << "fallocate";
    UniqueFd buffered = OpenOrFail(fs->path("keep"), O_RDWR);
    EXPECT_EQ(Err(pwrite(buffered.get(), "x", 1, 5)), EIO) << "buffered write";
  }
  EXPECT_EQ(Err(open(fs->path("new").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644)), EIO) << "create";
  EXPECT_EQ(Err(mkdir(fs->path("newdir").c_str(), 0755)), EIO) << "mkdir";
  EXPECT_EQ(Err(chmod(fs->path("keep").c_str(), 0600)), EIO) << "chmod";
  EXPECT_EQ(Err(rename(fs->path("keep").c_str(), fs->path("moved").c_str())), EIO) << "rename";
  EXPECT_EQ(Err(rmdir(fs->path("dir").c_str())), EIO) << "rmdir";
  EXPECT_EQ(Err(link(fs->path("keep").c_str(), fs->path("link").c_str())), EIO) << "link";
  EXPECT_EQ(Err(setxattr(fs->path("keep").c_str(), "user.x", "1", 1, 0)), EIO) << "setxattr";
  EXPECT_EQ(Err(fsync(sync_dir.get())), EIO) << "fsync of a directory";
  if (!synced.empty()) {
    EXPECT_EQ(Err(unlink(fs->path(synced[0]).c_str())), EIO) << "unlink";
  }

  // Reads keep working, with the data from before.
  {
    UniqueFd fd = OpenOrFail(fs->path("keep"), O_RDONLY | O_DIRECT);
    std::vector<uint8_t> got;
    ASSERT_EQ(DirectPread(fd.get(), 0, keep.buf.size(), &got), 0);
    EXPECT_TRUE(SameBytes(keep.bytes(), got)) << "reading after the shutdown";
  }
  struct stat st{};
  EXPECT_EQ(stat(fs->path("dir").c_str(), &st), 0);
  const std::string log = fs->DaemonLog();
  // One line says so, however many operations fail after it.
  EXPECT_NE(log.find("shutting down"), std::string::npos) << log;
  EXPECT_EQ(log.find("shutting down"), log.rfind("shutting down")) << "logged more than once:\n" << log;
  sync_dir.reset();

  // Unmount, make room, mount again: consistent, with everything that was
  // durable before the failure, and writable again.
  ASSERT_TRUE(fs->Unmount()) << fs->DaemonLog();
  ASSERT_EQ(unlink((dir / "metafs/filler").c_str()), 0);
  ASSERT_TRUE(fs->Mount());
  EXPECT_TRUE(SameBytes(keep.bytes(), ReadAllDirect(fs->path("keep")))) << "after remount";
  EXPECT_EQ(stat(fs->path("dir").c_str(), &st), 0);
  for (size_t i = 0; i < synced.size(); i++) {
    const std::string& name = synced[i];
    std::vector<uint8_t> want = Data(1, 1000 + std::stoi(name.substr(1))).bytes();
    EXPECT_TRUE(SameBytes(want, ReadAllDirect(fs->path(name)))) << name << " was fsynced before the failure";
  }
  Data post(16, 9);
  {
    UniqueFd fd = OpenOrFail(fs->path("post"), O_RDWR | O_CREAT | O_DIRECT);
    ASSERT_EQ(DirectPwrite(fd.get(), post, 0), 0);
    ASSERT_EQ(fsync(fd.get()), 0);
  }
  EXPECT_TRUE(SameBytes(post.bytes(), ReadAllDirect(fs->path("post"))));
  ASSERT_TRUE(fs->Unmount());
  fs.reset();
}

INSTANTIATE_TEST_SUITE_P(Modes, MetaFailureTest, ::testing::ValuesIn(EveryMode(2, 1, 1)), VariantName());

}  // namespace
}  // namespace deferfs_test
