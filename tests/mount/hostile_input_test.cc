// Bad and hostile input on a mounted deferfs: '.' and '..' in odd places,
// names of every byte, a very deep tree, offsets up to the largest file size
// and past it (EFBIG), zero-length and huge IO, permission checks by mode
// bits, and setuid/setgid clearing on write. ext4 is the reference: with
// DEFERFS_TEST_DIR=<ext4 dir> every test runs there unchanged (Remount() is
// then a no-op; the few deferfs-only checks are skipped).
// Name length limits (255 works, 256 is ENAMETOOLONG) are in namespace_test.
#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/io_helpers.h"
#include "tests/mount/fresh_fs_test.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using namespace std::chrono_literals;

constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;
// deferfs' largest file size (fs/filesystem.h kMaxFileSize): off_t's limit
// rounded down to a block.
constexpr uint64_t kDeferfsMaxFileSize = (uint64_t{1} << 63) - 4096;

// ------------------------------------------------------------------ helpers

struct stat Lstat(const std::string& p) {
  struct stat st{};
  if (lstat(p.c_str(), &st) != 0) ADD_FAILURE() << "lstat " << p << ": " << strerror(errno);
  return st;
}

ino_t Ino(const std::string& p) { return Lstat(p).st_ino; }

// name -> d_ino of every entry of `dir`, "." and ".." included; a name seen
// twice is a failure.
std::map<std::string, ino_t> Entries(const std::string& dir) {
  std::map<std::string, ino_t> out;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) {
    ADD_FAILURE() << "opendir " << dir << ": " << strerror(errno);
    return out;
  }
  while (dirent* e = readdir(d)) {
    if (!out.emplace(e->d_name, e->d_ino).second) ADD_FAILURE() << dir << " lists \"" << e->d_name << "\" twice";
  }
  closedir(d);
  return out;
}

std::set<std::string> Names(const std::string& dir) {
  std::set<std::string> out;
  for (const auto& [name, ino] : Entries(dir)) {
    if (name != "." && name != "..") out.insert(name);
  }
  return out;
}

void MakeFile(const std::string& p, mode_t mode = 0644, uid_t uid = 0, gid_t gid = 0) {
  UniqueFd fd(open(p.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600));
  ASSERT_TRUE(fd.ok()) << "create " << p << ": " << strerror(errno);
  ASSERT_EQ(fchown(fd.get(), uid, gid), 0) << p << ": " << strerror(errno);
  ASSERT_EQ(fchmod(fd.get(), mode), 0) << p << ": " << strerror(errno);  // after chown, which may clear bits
}

// lseek result: the offset, or -errno.
int64_t Seek(int fd, uint64_t off, int whence) {
  off_t r = lseek(fd, static_cast<off_t>(off), whence);
  return r < 0 ? -errno : r;
}

// The largest size ftruncate accepts: what the file system advertises as its
// maximum file size (EFBIG beyond). Leaves the file empty.
uint64_t LargestTruncate(int fd) {
  uint64_t lo = 0, hi = uint64_t{LLONG_MAX};
  if (ftruncate(fd, static_cast<off_t>(hi)) == 0) {
    lo = hi;
  } else {
    EXPECT_EQ(errno, EFBIG) << "ftruncate to LLONG_MAX";
    while (hi - lo > 1) {  // ftruncate(lo) works, ftruncate(hi) does not
      uint64_t mid = lo + (hi - lo) / 2;
      if (ftruncate(fd, static_cast<off_t>(mid)) == 0) {
        lo = mid;
      } else {
        EXPECT_EQ(errno, EFBIG) << "ftruncate to " << mid;
        hi = mid;
      }
    }
  }
  EXPECT_EQ(ftruncate(fd, 0), 0);
  return lo;
}

// A fixture per test: a fresh file system (or ext4 subdir) each time.
class HostileTest : public FreshFsTest {};

// ------------------------------------------------------------ '.' and '..'

TEST_F(HostileTest, DotAndDotDotInOddPlaces) {
  ASSERT_EQ(mkdir(P("a").c_str(), 0755), 0);
  ASSERT_EQ(mkdir(P("a/b").c_str(), 0755), 0);
  ASSERT_NO_FATAL_FAILURE(MakeFile(P("f")));

  // Creation through '.' and '..' lands where the path resolves to.
  EXPECT_EQ(mkdir(P("a/./c").c_str(), 0755), 0);
  EXPECT_EQ(mkdir(P("a/b/../d").c_str(), 0755), 0);
  EXPECT_EQ(mkdir(P("a/b/./../b/../e").c_str(), 0755), 0);
  EXPECT_EQ((Names(P("a"))), (std::set<std::string>{"b", "c", "d", "e"}));
  EXPECT_TRUE(Names(P("a/b")).empty());
  EXPECT_EQ(Ino(P("a/b/../c/./..")), Ino(P("a")));

  // '.' and '..' as the last component: they always exist and cannot be
  // created, removed or renamed.
  EXPECT_EQ(Err(mkdir(P("a/.").c_str(), 0755)), EEXIST);
  EXPECT_EQ(Err(mkdir(P("a/..").c_str(), 0755)), EEXIST);
  EXPECT_EQ(Err(rmdir(P("a/b/.").c_str())), EINVAL);
  EXPECT_EQ(Err(rmdir(P("a/b/..").c_str())), ENOTEMPTY);
  EXPECT_EQ(Err(unlink(P("a/.").c_str())), EISDIR);
  EXPECT_EQ(Err(unlink(P("a/..").c_str())), EISDIR);
  EXPECT_EQ(Err(rename(P("f").c_str(), P("a/..").c_str())), EBUSY);
  EXPECT_EQ(Err(rename(P("f").c_str(), P("a/.").c_str())), EBUSY);
  EXPECT_EQ(Err(rename(P("a/b/..").c_str(), P("x").c_str())), EBUSY);
  EXPECT_EQ(Err(rename(P("a/b/.").c_str(), P("x").c_str())), EBUSY);
  EXPECT_EQ(Err(link(P("f").c_str(), P("a/..").c_str())), EEXIST);
  EXPECT_EQ(Err(symlink("t", P("a/.").c_str())), EEXIST);
  EXPECT_EQ(Err(mknod(P("a/..").c_str(), S_IFIFO | 0600, 0)), EEXIST);
  EXPECT_EQ(Err(open(P("a/.").c_str(), O_CREAT | O_WRONLY, 0644)), EISDIR);
  // A path through a file: ENOTDIR, even when '..' would lead back out.
  EXPECT_EQ(Err(mkdir(P("f/../g").c_str(), 0755)), ENOTDIR);
  struct stat st{};
  EXPECT_EQ(Err(stat(P("f/.").c_str(), &st)), ENOTDIR);

  // Renames through '..' work like any other path.
  EXPECT_EQ(rename(P("a/c").c_str(), P("a/b/../z").c_str()), 0);
  EXPECT_EQ(rename(P("f").c_str(), P("a/b/./../b/f").c_str()), 0);
  EXPECT_EQ((Names(P("a"))), (std::set<std::string>{"b", "d", "e", "z"}));
  EXPECT_EQ(Names(P("a/b")), std::set<std::string>{"f"});
  EXPECT_EQ(Names(P("")), std::set<std::string>{"a"});  // nothing named "x" or "g" appeared
}

// ".." names the parent, in readdir and in lookups, also after the directory
// moved and after a remount.
TEST_F(HostileTest, DotDotFollowsTheParent) {
  ASSERT_EQ(mkdir(P("p1").c_str(), 0755), 0);
  ASSERT_EQ(mkdir(P("p2").c_str(), 0755), 0);
  ASSERT_EQ(mkdir(P("p1/c").c_str(), 0755), 0);
  auto check = [&](const std::string& parent) {
    SCOPED_TRACE(parent);
    auto e = Entries(P(parent + "/c"));
    EXPECT_EQ(e.size(), 2u);
    EXPECT_EQ(e[".."], Ino(P(parent)));
    EXPECT_EQ(e["."], Ino(P(parent + "/c")));
    EXPECT_EQ(Ino(P(parent + "/c/..")), Ino(P(parent)));
    EXPECT_EQ(Entries(P(parent))[".."], Ino(P("")));
  };
  check("p1");
  ASSERT_EQ(rename(P("p1/c").c_str(), P("p2/c").c_str()), 0);
  check("p2");
  ASSERT_EQ(renameat2(AT_FDCWD, P("p2").c_str(), AT_FDCWD, P("p1").c_str(), RENAME_EXCHANGE), 0);
  check("p1");
  ASSERT_TRUE(Remount());
  check("p1");
  EXPECT_EQ(Lstat(P("p1")).st_nlink, 3u);
  EXPECT_EQ(Lstat(P("p2")).st_nlink, 2u);
}

// Names are bytes: any byte but '/' and NUL, including ones that look like
// dots, spaces, newlines and invalid UTF-8.
TEST_F(HostileTest, NamesOfAnyByte) {
  std::string every;
  for (int c = 1; c < 256; c++) {
    if (c != '/') every.push_back(static_cast<char>(c));
  }
  ASSERT_EQ(every.size(), 254u);
  const std::vector<std::string> names = {every, "...", ".hidden", "..x", "x..", " ", "\n", "-", "\xff\xfe", ". ", ".. "};
  for (const auto& n : names) ASSERT_NO_FATAL_FAILURE(MakeFile(P(n))) << "name of " << n.size() << " bytes";
  const std::set<std::string> want(names.begin(), names.end());
  EXPECT_EQ(Names(P("")), want);
  EXPECT_EQ(Entries(P("")).size(), want.size() + 2);  // one "." and one ".." only
  for (const auto& n : names) {
    struct stat st{};
    EXPECT_EQ(lstat(P(n).c_str(), &st), 0) << "name of " << n.size() << " bytes";
  }
  ASSERT_EQ(rename(P(every).c_str(), P("...").c_str()), 0);  // over a dot-like name
  ASSERT_TRUE(Remount());
  std::set<std::string> after = want;
  after.erase(every);
  EXPECT_EQ(Names(P("")), after);
}

// --------------------------------------------------------------- deep tree

TEST_F(HostileTest, VeryDeepTree) {
  constexpr int kDepth = 1000;
  // Built with mkdirat/openat so no single path gets long.
  {
    UniqueFd dir(open(P("").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    ASSERT_TRUE(dir.ok()) << strerror(errno);
    for (int i = 0; i < kDepth; i++) {
      ASSERT_EQ(mkdirat(dir.get(), "d", 0755), 0) << "level " << i << ": " << strerror(errno);
      UniqueFd sub(openat(dir.get(), "d", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      ASSERT_TRUE(sub.ok()) << "level " << i << ": " << strerror(errno);
      dir = std::move(sub);
    }
    UniqueFd leaf(openat(dir.get(), "leaf", O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644));
    ASSERT_TRUE(leaf.ok()) << strerror(errno);
    ASSERT_EQ(write(leaf.get(), "bottom", 6), 6);
  }
  std::string deep = P("");
  for (int i = 0; i < kDepth; i++) deep += "/d";
  ASSERT_LT(deep.size() + 5, size_t{PATH_MAX});
  auto walk = [&] {
    UniqueFd fd(open((deep + "/leaf").c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << "open by the full path: " << strerror(errno);
    char buf[16] = {};
    EXPECT_EQ(read(fd.get(), buf, sizeof buf), 6);
    EXPECT_STREQ(buf, "bottom");
    // The same place, reached by going all the way down and half way back up.
    std::string updown = deep;
    for (int i = 0; i < kDepth / 2; i++) updown += "/..";
    EXPECT_EQ(Ino(updown), Ino(deep.substr(0, P("").size() + 2 * (kDepth / 2))));
  };
  walk();
  ASSERT_TRUE(Remount());
  walk();  // cold: every level looked up again

  EXPECT_EQ(Err(rmdir(P("d").c_str())), ENOTEMPTY);
  ASSERT_EQ(unlink((deep + "/leaf").c_str()), 0);
  for (int i = kDepth; i > 0; i--) {
    ASSERT_EQ(rmdir(deep.substr(0, P("").size() + 2 * i).c_str()), 0) << "level " << i << ": " << strerror(errno);
  }
  EXPECT_TRUE(Names(P("")).empty());
  ASSERT_TRUE(Remount());
  EXPECT_TRUE(Names(P("")).empty());
}

// -------------------------------------------------------- huge offsets

TEST_F(HostileTest, LargestFileSizeAndBeyond) {
  UniqueFd fd(open(P("big").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  const uint64_t max = LargestTruncate(fd.get());
  if (!reference()) {
    EXPECT_EQ(max, kDeferfsMaxFileSize);
  }
  ASSERT_EQ(max % 4096, 0u) << max;
  struct statvfs sv0{};
  ASSERT_EQ(statvfs(P("").c_str(), &sv0), 0);

  // The last block of the largest file: written, read back, sparse.
  UniqueFd dfd(open(P("big").c_str(), O_RDWR | O_DIRECT | O_CLOEXEC));
  ASSERT_TRUE(dfd.ok()) << strerror(errno);
  std::mt19937_64 rng(1);
  AlignedBuf data(4096), back(4096);
  FillRandom(rng, data.data(), data.size());
  ASSERT_EQ(pwrite(dfd.get(), data.data(), 4096, static_cast<off_t>(max - 4096)), 4096) << strerror(errno);
  ASSERT_EQ(pread(dfd.get(), back.data(), 4096, static_cast<off_t>(max - 4096)), 4096) << strerror(errno);
  EXPECT_TRUE(SameBytes(data.data(), back.data(), 4096));
  struct stat st{};
  ASSERT_EQ(fstat(fd.get(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), max);
  EXPECT_GE(st.st_blocks, 8);
  EXPECT_LE(st.st_blocks, 32) << "a write at the top must not allocate the file below it";
  EXPECT_EQ(pread(fd.get(), back.data(), 1, static_cast<off_t>(max)), 0);  // EOF

  // SEEK_DATA / SEEK_HOLE at the top.
  EXPECT_EQ(Seek(fd.get(), 0, SEEK_DATA), static_cast<int64_t>(max - 4096));
  EXPECT_EQ(Seek(fd.get(), 0, SEEK_HOLE), 0);
  EXPECT_EQ(Seek(fd.get(), max - 4096, SEEK_HOLE), static_cast<int64_t>(max));
  EXPECT_EQ(Seek(fd.get(), max - 1, SEEK_DATA), static_cast<int64_t>(max - 1));
  EXPECT_EQ(Seek(fd.get(), max, SEEK_DATA), -ENXIO);
  EXPECT_EQ(Seek(fd.get(), max, SEEK_HOLE), -ENXIO);

  // Past the maximum: EFBIG, or a short write that stops at it. (Ranges
  // whose end overflows off_t are the VFS's EINVAL and never reach us.)
  EXPECT_EQ(Err(pwrite(fd.get(), "x", 1, static_cast<off_t>(max))), EFBIG);
  EXPECT_EQ(Err(pwrite(fd.get(), "x", 1, static_cast<off_t>(max + 1000))), EFBIG);
  char chunk[4096];
  std::memset(chunk, 'y', sizeof chunk);
  EXPECT_EQ(pwrite(fd.get(), chunk, sizeof chunk, static_cast<off_t>(max - 2048)), 2048);
  EXPECT_EQ(Err(ftruncate(fd.get(), static_cast<off_t>(max + 1))), EFBIG);
  EXPECT_EQ(Err(fallocate(fd.get(), 0, static_cast<off_t>(max - 4096), 4097)), EFBIG);
  EXPECT_EQ(Err(fallocate(fd.get(), FALLOC_FL_KEEP_SIZE, static_cast<off_t>(max), 4096)), EFBIG);
  ASSERT_EQ(fstat(fd.get(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), max);

  // Preallocation just below the top is fine and stays a hole for SEEK_DATA.
  EXPECT_EQ(fallocate(fd.get(), FALLOC_FL_KEEP_SIZE, static_cast<off_t>(max - 3 * 4096), 8192), 0) << strerror(errno);
  EXPECT_EQ(Seek(fd.get(), 0, SEEK_DATA), static_cast<int64_t>(max - 4096));
  EXPECT_EQ(ftruncate(fd.get(), static_cast<off_t>(max)), 0);

  fd.reset();
  dfd.reset();
  ASSERT_TRUE(Remount());
  dfd = UniqueFd(open(P("big").c_str(), O_RDWR | O_DIRECT | O_CLOEXEC));
  ASSERT_TRUE(dfd.ok()) << strerror(errno);
  ASSERT_EQ(pread(dfd.get(), back.data(), 4096, static_cast<off_t>(max - 4096)), 4096) << strerror(errno);
  std::memset(data.data() + 2048, 'y', 2048);  // the short write's bytes
  EXPECT_TRUE(SameBytes(data.data(), back.data(), 4096));
  EXPECT_EQ(static_cast<uint64_t>(Lstat(P("big")).st_size), max);

  // Truncating it away gives every block back.
  ASSERT_EQ(ftruncate(dfd.get(), 0), 0);
  EXPECT_EQ(Lstat(P("big")).st_blocks, 0);
  if (!reference()) {
    ASSERT_EQ(fsync(dfd.get()), 0);  // freed blocks count as free once durable
    struct statvfs sv1{};
    ASSERT_EQ(statvfs(P("").c_str(), &sv1), 0);
    EXPECT_EQ(sv1.f_bfree, sv0.f_bfree);
  }
}

// ---------------------------------------------------- zero-length, huge IO

TEST_F(HostileTest, ZeroLengthIoChangesNothing) {
  ASSERT_NO_FATAL_FAILURE(MakeFile(P("f")));
  {
    UniqueFd fd(open(P("f").c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_EQ(write(fd.get(), std::string(8192, 'a').data(), 8192), 8192);
  }
  const struct stat before = Lstat(P("f"));
  std::this_thread::sleep_for(30ms);  // a change would now show in the timestamps
  AlignedBuf buf(4096);
  for (int flags : {O_RDWR, O_RDWR | O_DIRECT}) {
    SCOPED_TRACE(flags & O_DIRECT ? "O_DIRECT" : "buffered");
    UniqueFd fd(open(P("f").c_str(), flags | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    EXPECT_EQ(write(fd.get(), buf.data(), 0), 0);
    EXPECT_EQ(pwrite(fd.get(), buf.data(), 0, 4096), 0);
    EXPECT_EQ(pwrite(fd.get(), buf.data(), 0, off_t{1} << 40), 0);  // must not extend the file
    EXPECT_EQ(read(fd.get(), buf.data(), 0), 0);
    EXPECT_EQ(pread(fd.get(), buf.data(), 0, 0), 0);
    EXPECT_EQ(pread(fd.get(), buf.data(), 0, off_t{1} << 40), 0);
    EXPECT_EQ(pread(fd.get(), buf.data(), 4096, 8192), 0);  // at EOF
  }
  ASSERT_TRUE(Remount());
  const struct stat after = Lstat(P("f"));
  EXPECT_EQ(after.st_size, 8192);
  EXPECT_EQ(after.st_blocks, before.st_blocks);
  EXPECT_EQ(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
  EXPECT_EQ(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);
  EXPECT_EQ(after.st_ctim.tv_nsec, before.st_ctim.tv_nsec);
}

TEST_F(HostileTest, HugeDirectIoIsSplitAndIntact) {
  constexpr size_t k64M = 64u << 20;
  std::mt19937_64 rng(64);
  AlignedBuf data(k64M), back(k64M);
  FillRandom(rng, data.data(), k64M);
  {
    UniqueFd fd(open(P("huge").c_str(), O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    // One system call each; the kernel splits it into max_write requests.
    ASSERT_EQ(pwrite(fd.get(), data.data(), k64M, 4096), static_cast<ssize_t>(k64M)) << strerror(errno);
    ASSERT_EQ(pread(fd.get(), back.data(), k64M, 4096), static_cast<ssize_t>(k64M)) << strerror(errno);
    EXPECT_TRUE(SameBytes(data.data(), back.data(), k64M, 4096));
  }
  ASSERT_TRUE(Remount());
  {
    UniqueFd fd(open(P("huge").c_str(), O_RDONLY | O_CLOEXEC));  // through the page cache this time
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    std::memset(back.data(), 0, k64M);
    ASSERT_EQ(PreadUpTo(fd.get(), back.data(), k64M, 4096), static_cast<ssize_t>(k64M));
    EXPECT_TRUE(SameBytes(data.data(), back.data(), k64M, 4096));
    char head[4096];
    ASSERT_EQ(pread(fd.get(), head, sizeof head, 0), 4096);
    EXPECT_TRUE(std::all_of(head, head + sizeof head, [](char c) { return c == 0; }))
        << "the hole before the data must read as zeros";
  }
}

TEST_F(HostileTest, GigabyteSparseReadIsZerosAroundTheData) {
  constexpr size_t k1G = size_t{1} << 30;
  constexpr off_t kMarkAt = 512 << 20;
  UniqueFd fd(open(P("sparse").c_str(), O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  ASSERT_EQ(ftruncate(fd.get(), static_cast<off_t>(k1G)), 0);
  AlignedBuf mark(4096);
  std::memset(mark.data(), 0x77, 4096);
  ASSERT_EQ(pwrite(fd.get(), mark.data(), 4096, kMarkAt), 4096);

  void* mem = mmap(nullptr, k1G, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(mem, MAP_FAILED) << strerror(errno);
  auto* p = static_cast<uint8_t*>(mem);
  std::memset(p, 0x55, k1G);  // so that a byte the read skipped cannot pass for a zero
  EXPECT_EQ(pread(fd.get(), p, k1G, 0), static_cast<ssize_t>(k1G)) << strerror(errno);
  static const uint8_t kZeros[4096] = {};
  size_t bad = 0;
  for (size_t off = 0; off < k1G; off += 4096) {
    const bool is_mark = off == static_cast<size_t>(kMarkAt);
    if (std::memcmp(p + off, is_mark ? mark.data() : kZeros, 4096) != 0 && bad++ == 0) {
      ADD_FAILURE() << "block at " << off << " holds wrong bytes (first: 0x" << std::hex << int{p[off]} << ")";
    }
  }
  EXPECT_EQ(bad, 0u);
  munmap(mem, k1G);
  struct stat st{};
  ASSERT_EQ(fstat(fd.get(), &st), 0);
  EXPECT_EQ(st.st_blocks, 8);
}

// ---------------------------------------------------------- permissions

// open(2) as another user follows the owner, group and other bits (only the
// class the user falls in counts), and what it allows really works.
TEST_F(HostileTest, OpenAsAnotherUserFollowsModeBits) {
  struct Case {
    const char* name;
    mode_t mode;
    uid_t uid;
    gid_t gid;
    int want_read, want_write;  // errno of open(O_RDONLY), open(O_WRONLY) as nobody:nogroup
  };
  const Case cases[] = {
      {"other-none", 0660, 0, 0, EACCES, EACCES},
      {"other-r", 0604, 0, 0, 0, EACCES},
      {"other-w", 0602, 0, 0, EACCES, 0},
      {"group-r", 0640, 0, kNogroup, 0, EACCES},
      {"group-w", 0620, 0, kNogroup, EACCES, 0},
      {"group-none-other-rw", 0606, 0, kNogroup, EACCES, EACCES},  // the group class applies, not other
      {"owner-none", 0066, kNobody, kNogroup, EACCES, EACCES},    // the owner class applies
      {"owner-r", 0466, kNobody, kNogroup, 0, EACCES},
      {"owner-rw", 0600, kNobody, 0, 0, 0},
  };
  for (const Case& c : cases) ASSERT_NO_FATAL_FAILURE(MakeFile(P(c.name), c.mode, c.uid, c.gid));
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string p = P(c.name);
    EXPECT_EQ(RunAs(kNobody, kNogroup, [&] { return Err(open(p.c_str(), O_RDONLY)); }), c.want_read);
    EXPECT_EQ(RunAs(kNobody, kNogroup, [&] { return Err(open(p.c_str(), O_WRONLY)); }), c.want_write);
    EXPECT_EQ(RunAs(kNobody, kNogroup, [&] { return Err(open(p.c_str(), O_RDWR)); }),
              c.want_read ? c.want_read : c.want_write);
    EXPECT_EQ(RunAs(kNobody, kNogroup, [&] { return Err(truncate(p.c_str(), 1)); }), c.want_write);
    if (c.want_write == 0) {
      // The write lands.
      EXPECT_EQ(RunAs(kNobody, kNogroup,
                      [&] {
                        UniqueFd fd(open(p.c_str(), O_WRONLY));
                        if (!fd.ok()) return errno;
                        return pwrite(fd.get(), "w", 1, 0) == 1 ? 0 : (errno ? errno : EIO);
                      }),
                0);
      char b = 0;
      UniqueFd fd(open(p.c_str(), O_RDONLY));
      EXPECT_EQ(pread(fd.get(), &b, 1, 0), 1);
      EXPECT_EQ(b, 'w');
    }
  }
  // Root is not bound by mode bits.
  UniqueFd fd(open(P("owner-none").c_str(), O_RDWR));
  EXPECT_TRUE(fd.ok()) << strerror(errno);

  // Directories: search (x) to reach a file inside, read (r) to list it.
  ASSERT_EQ(mkdir(P("closed").c_str(), 0700), 0);
  ASSERT_EQ(mkdir(P("search-only").c_str(), 0711), 0);
  ASSERT_NO_FATAL_FAILURE(MakeFile(P("closed/f"), 0666));
  ASSERT_NO_FATAL_FAILURE(MakeFile(P("search-only/f"), 0666));
  EXPECT_EQ(RunAs(kNobody, kNogroup, [&] { return Err(open(P("closed/f").c_str(), O_RDONLY)); }), EACCES);
  EXPECT_EQ(RunAs(kNobody, kNogroup, [&] { return Err(open(P("search-only/f").c_str(), O_RDWR)); }), 0);
  EXPECT_EQ(RunAs(kNobody, kNogroup, [&] { return Err(open(P("search-only").c_str(), O_RDONLY | O_DIRECTORY)); }),
            EACCES);
  EXPECT_EQ(RunAs(kNobody, kNogroup, [&] { return Err(unlink(P("search-only/f").c_str())); }), EACCES);
}

// A write by a user without CAP_FSETID clears setuid, and setgid when the
// file is group-executable (file_remove_privs), through the page cache and
// O_DIRECT alike; root's writes keep them.
// One difference from ext4: since Linux 6.2 the VFS also clears setgid of a
// file that is not group-executable when the writer is not in its group.
// FUSE without HANDLE_KILLPRIV_V2 (which libfuse 3.14 lacks) applies the
// older rule in the kernel for buffered writes, and deferfs follows the same
// rule for direct writes so that both paths agree.
TEST_F(HostileTest, WriteByNonOwnerClearsSetuidSetgid) {
  struct Case {
    const char* name;
    mode_t mode;
    gid_t gid;
    bool as_root, direct;
    mode_t want, want_ext4;
  };
  const Case cases[] = {
      {"both", 06777, 0, false, false, 0777, 0777},
      {"both-direct", 06777, 0, false, true, 0777, 0777},
      {"sgid-only", 02777, 0, false, true, 0777, 0777},
      {"sgid-no-gx-in-group", 06767, kNogroup, false, false, 02767, 02767},
      {"sgid-no-gx-in-group-direct", 06767, kNogroup, false, true, 02767, 02767},
      {"sgid-no-gx-other-group", 06767, 0, false, false, 02767, 0767},
      {"sgid-no-gx-other-group-direct", 06767, 0, false, true, 02767, 0767},
      {"by-root", 06777, 0, true, false, 06777, 06777},
      {"by-root-direct", 06777, 0, true, true, 06777, 06777},
  };
  for (const Case& c : cases) ASSERT_NO_FATAL_FAILURE(MakeFile(P(c.name), c.mode, 0, c.gid));
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string p = P(c.name);
    auto write_it = [&] {
      UniqueFd fd(open(p.c_str(), O_WRONLY | (c.direct ? O_DIRECT : 0)));
      if (!fd.ok()) return errno;
      AlignedBuf b(4096);
      std::memset(b.data(), 'w', 4096);
      return pwrite(fd.get(), b.data(), 4096, 0) == 4096 ? 0 : (errno ? errno : EIO);
    };
    EXPECT_EQ(c.as_root ? write_it() : RunAs(kNobody, kNogroup, write_it), 0);
    EXPECT_EQ(Lstat(p).st_mode & 07777, reference() ? c.want_ext4 : c.want) << std::oct << (Lstat(p).st_mode & 07777);
    EXPECT_EQ(Lstat(p).st_size, 4096);
  }
  // truncate by another user, and chown (even by root), clear them too.
  ASSERT_NO_FATAL_FAILURE(MakeFile(P("truncated"), 06777));
  ASSERT_NO_FATAL_FAILURE(MakeFile(P("chowned"), 06777));
  EXPECT_EQ(RunAs(kNobody, kNogroup, [&] { return Err(truncate(P("truncated").c_str(), 10)); }), 0);
  EXPECT_EQ(Lstat(P("truncated")).st_mode & 07777, 0777u);
  ASSERT_EQ(chown(P("chowned").c_str(), kNobody, kNogroup), 0);
  EXPECT_EQ(Lstat(P("chowned")).st_mode & 07777, 0777u);

  ASSERT_TRUE(Remount());
  for (const Case& c : cases) {
    EXPECT_EQ(Lstat(P(c.name)).st_mode & 07777, reference() ? c.want_ext4 : c.want) << c.name << " after remount";
  }
}

}  // namespace
}  // namespace deferfs_test
