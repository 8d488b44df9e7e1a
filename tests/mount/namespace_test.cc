// POSIX namespace behaviour of a mounted deferfs: names, inodes, attributes,
// directories, xattrs, permissions. ext4 is the reference for every result
// and errno (run with DEFERFS_TEST_DIR=<ext4 dir> to check the tests).
// "Persists" checks repeat after Remount(); in reference mode that is a no-op.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/fresh_fs_test.h"
#include "tests/mount/io_helpers.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using namespace std::chrono_literals;

constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;

// ------------------------------------------------------------------ helpers

struct stat Lstat(const std::string& p) {
  struct stat st{};
  if (lstat(p.c_str(), &st) != 0) ADD_FAILURE() << "lstat " << p << ": " << strerror(errno);
  return st;
}

int64_t Ns(const timespec& ts) { return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec; }

int64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return Ns(ts);
}

// Lets the (coarse) timestamp clock move on, so "updated" is observable.
void Tick() { std::this_thread::sleep_for(30ms); }

// Creates `p` with exactly `mode` (independent of the umask) and `size`.
// Sizes come from ftruncate, not write: these tests exercise the namespace,
// not the data path.
void MakeFile(const std::string& p, mode_t mode = 0644, off_t size = 0) {
  UniqueFd fd(open(p.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, mode));
  ASSERT_TRUE(fd.ok()) << "create " << p << ": " << strerror(errno);
  ASSERT_EQ(fchmod(fd.get(), mode), 0) << strerror(errno);
  if (size != 0) {
    ASSERT_EQ(ftruncate(fd.get(), size), 0) << "ftruncate " << p << ": " << strerror(errno);
  }
}

off_t SizeOf(const std::string& p) { return Lstat(p).st_size; }

void MakeDir(const std::string& p, mode_t mode = 0755) {
  ASSERT_EQ(mkdir(p.c_str(), mode), 0) << "mkdir " << p << ": " << strerror(errno);
  ASSERT_EQ(chmod(p.c_str(), mode), 0) << strerror(errno);
}

std::string ReadLink(const std::string& p) {
  std::string buf(8192, '\0');
  ssize_t n = readlink(p.c_str(), buf.data(), buf.size());
  if (n < 0) {
    ADD_FAILURE() << "readlink " << p << ": " << strerror(errno);
    return "";
  }
  buf.resize(n);
  return buf;
}

struct DirCloser {
  void operator()(DIR* d) const { closedir(d); }
};
using DirPtr = std::unique_ptr<DIR, DirCloser>;

// name -> d_type of every entry of `dir`, "." and ".." included.
std::map<std::string, unsigned char> ListWithTypes(const std::string& dir) {
  std::map<std::string, unsigned char> out;
  DirPtr d(opendir(dir.c_str()));
  if (!d) {
    ADD_FAILURE() << "opendir " << dir << ": " << strerror(errno);
    return out;
  }
  errno = 0;
  while (dirent* e = readdir(d.get())) {
    if (!out.emplace(e->d_name, e->d_type).second) ADD_FAILURE() << dir << ": duplicate " << e->d_name;
  }
  if (errno != 0) ADD_FAILURE() << "readdir " << dir << ": " << strerror(errno);
  return out;
}

// Sorted names in `dir`, without "." and "..".
std::vector<std::string> List(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& [name, type] : ListWithTypes(dir)) {
    if (name != "." && name != "..") names.push_back(name);
  }
  return names;
}

std::map<std::string, std::string> Xattrs(const std::string& p) {
  std::map<std::string, std::string> out;
  ssize_t n = llistxattr(p.c_str(), nullptr, 0);
  if (n < 0) {
    ADD_FAILURE() << "llistxattr " << p << ": " << strerror(errno);
    return out;
  }
  std::string names(n, '\0');
  n = llistxattr(p.c_str(), names.data(), names.size());
  names.resize(std::max<ssize_t>(n, 0));
  for (size_t pos = 0; pos < names.size();) {
    std::string name = names.c_str() + pos;
    pos += name.size() + 1;
    std::string value(65536, '\0');
    ssize_t v = lgetxattr(p.c_str(), name.c_str(), value.data(), value.size());
    if (v < 0) {
      ADD_FAILURE() << "lgetxattr " << p << " " << name << ": " << strerror(errno);
      continue;
    }
    value.resize(v);
    out[name] = value;
  }
  return out;
}

// "b is later than a", with both values in the message.
::testing::AssertionResult Later(const timespec& a, const timespec& b) {
  if (Ns(b) > Ns(a)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << Ns(b) << " is not later than " << Ns(a);
}

::testing::AssertionResult Same(const timespec& a, const timespec& b) {
  if (Ns(b) == Ns(a)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << Ns(b) << " != " << Ns(a);
}

// A fixture per test: a fresh file system (or ext4 subdir) each time.
class NamespaceTest : public FreshFsTest {};

// ------------------------------------------------------- lookup and attributes

TEST_F(NamespaceTest, LookupAndStat) {
  MakeFile(P("f"), 0644, 5);
  MakeDir(P("d"));
  struct stat st = Lstat(P("f"));
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(st.st_size, 5);
  EXPECT_EQ(st.st_nlink, 1u);
  EXPECT_EQ(st.st_uid, 0u);
  EXPECT_EQ(st.st_gid, 0u);
  EXPECT_NE(st.st_ino, Lstat(P("d")).st_ino);
  EXPECT_TRUE(S_ISDIR(Lstat(P("d")).st_mode));
  EXPECT_TRUE(S_ISDIR(Lstat(P("")).st_mode));

  struct stat st2{};
  EXPECT_EQ(Err(stat(P("missing").c_str(), &st2)), ENOENT);
  EXPECT_EQ(Err(stat(P("d/missing").c_str(), &st2)), ENOENT);
  EXPECT_EQ(Err(stat(P("f/x").c_str(), &st2)), ENOTDIR);
  // fstat of an open file sees the same inode as the path lookup.
  UniqueFd fd(open(P("f").c_str(), O_RDONLY));
  ASSERT_TRUE(fd.ok());
  ASSERT_EQ(fstat(fd.get(), &st2), 0);
  EXPECT_EQ(st2.st_ino, st.st_ino);
  EXPECT_EQ(st2.st_size, 5);
}

TEST_F(NamespaceTest, ChmodPersists) {
  MakeFile(P("f"));
  MakeDir(P("d"));
  ASSERT_EQ(chmod(P("f").c_str(), 04751), 0);
  ASSERT_EQ(chmod(P("d").c_str(), 01700), 0);
  EXPECT_EQ(Lstat(P("f")).st_mode, S_IFREG | 04751);
  EXPECT_EQ(Lstat(P("d")).st_mode, S_IFDIR | 01700);
  ASSERT_TRUE(Remount());
  EXPECT_EQ(Lstat(P("f")).st_mode, S_IFREG | 04751);
  EXPECT_EQ(Lstat(P("d")).st_mode, S_IFDIR | 01700);
}

TEST_F(NamespaceTest, ChownPersists) {
  MakeFile(P("f"), 06755);
  ASSERT_EQ(symlink("f", P("l").c_str()), 0);
  ASSERT_EQ(chown(P("f").c_str(), 1234, 5678), 0);
  // Linux drops set-uid (and set-gid with group exec) on chown, even by root.
  EXPECT_EQ(Lstat(P("f")).st_mode, S_IFREG | 0755);
  ASSERT_EQ(chown(P("f").c_str(), static_cast<uid_t>(-1), 4321), 0);  // -1 keeps the owner
  ASSERT_EQ(lchown(P("l").c_str(), 42, 43), 0);                        // the link, not its target

  auto check = [&] {
    struct stat f = Lstat(P("f")), l = Lstat(P("l"));
    EXPECT_EQ(f.st_uid, 1234u);
    EXPECT_EQ(f.st_gid, 4321u);
    EXPECT_EQ(l.st_uid, 42u);
    EXPECT_EQ(l.st_gid, 43u);
  };
  check();
  ASSERT_TRUE(Remount());
  check();
}

TEST_F(NamespaceTest, TruncateEmptyFilePersists) {
  MakeFile(P("f"));
  ASSERT_EQ(truncate(P("f").c_str(), 12345), 0);
  EXPECT_EQ(Lstat(P("f")).st_size, 12345);
  {
    UniqueFd fd(open(P("g").c_str(), O_CREAT | O_RDWR, 0644));
    ASSERT_TRUE(fd.ok());
    ASSERT_EQ(ftruncate(fd.get(), 1 << 20), 0);
    struct stat st{};
    ASSERT_EQ(fstat(fd.get(), &st), 0);
    EXPECT_EQ(st.st_size, 1 << 20);
  }
  ASSERT_TRUE(Remount());
  EXPECT_EQ(Lstat(P("f")).st_size, 12345);
  EXPECT_EQ(Lstat(P("g")).st_size, 1 << 20);
  ASSERT_EQ(truncate(P("g").c_str(), 0), 0);
  EXPECT_EQ(Lstat(P("g")).st_size, 0);
}

TEST_F(NamespaceTest, UtimensatNanosecondsPersist) {
  MakeFile(P("f"));
  const timespec atime{1'000'000'001, 123'456'789}, mtime{1'100'000'002, 987'654'321};
  timespec ts[2] = {atime, mtime};
  ASSERT_EQ(utimensat(AT_FDCWD, P("f").c_str(), ts, 0), 0) << strerror(errno);
  struct stat st = Lstat(P("f"));
  EXPECT_TRUE(Same(st.st_atim, atime));
  EXPECT_TRUE(Same(st.st_mtim, mtime));

  // UTIME_OMIT keeps atime; mtime gets the new explicit value.
  const timespec mtime2{1'200'000'003, 1};
  timespec omit[2] = {{0, UTIME_OMIT}, mtime2};
  ASSERT_EQ(utimensat(AT_FDCWD, P("f").c_str(), omit, 0), 0);
  st = Lstat(P("f"));
  EXPECT_TRUE(Same(st.st_atim, atime));
  EXPECT_TRUE(Same(st.st_mtim, mtime2));

  ASSERT_TRUE(Remount());
  st = Lstat(P("f"));
  EXPECT_TRUE(Same(st.st_atim, atime));
  EXPECT_TRUE(Same(st.st_mtim, mtime2));

  // UTIME_NOW sets the current time; the other stays put.
  const int64_t before = NowNs();
  timespec now[2] = {{0, UTIME_OMIT}, {0, UTIME_NOW}};
  ASSERT_EQ(utimensat(AT_FDCWD, P("f").c_str(), now, 0), 0);
  const int64_t after = NowNs();
  st = Lstat(P("f"));
  EXPECT_TRUE(Same(st.st_atim, atime));
  // Slack: file systems stamp with a coarse clock that may lag a tick.
  EXPECT_GE(Ns(st.st_mtim), before - int64_t{100'000'000});
  EXPECT_LE(Ns(st.st_mtim), after + int64_t{100'000'000});
  EXPECT_GE(Ns(st.st_ctim), Ns(st.st_mtim) - int64_t{100'000'000});

  // utimensat with NULL: both become now.
  ASSERT_EQ(utimensat(AT_FDCWD, P("f").c_str(), nullptr, 0), 0);
  st = Lstat(P("f"));
  EXPECT_GE(Ns(st.st_atim), before - int64_t{100'000'000});
}

// Times before 1970 keep their fraction of a second (tv_nsec stays in
// [0, 1e9)), and times a filesystem cannot store are clamped, never wrapped
// around: deferfs stores 1677 to 2262, ext4 1901 to 2446.
TEST_F(NamespaceTest, TimesBefore1970AndOutOfRange) {
  MakeFile(P("f"));
  const timespec before_epoch{-2, 500'000'000}, long_ago{-300'000'000, 123'456'789};
  timespec ts[2] = {before_epoch, long_ago};
  ASSERT_EQ(utimensat(AT_FDCWD, P("f").c_str(), ts, 0), 0) << strerror(errno);
  for (int pass = 0; pass < 2; pass++) {
    struct stat st = Lstat(P("f"));
    EXPECT_TRUE(Same(st.st_atim, before_epoch)) << st.st_atim.tv_sec << "." << st.st_atim.tv_nsec;
    EXPECT_TRUE(Same(st.st_mtim, long_ago)) << st.st_mtim.tv_sec << "." << st.st_mtim.tv_nsec;
    if (pass == 0) {
      ASSERT_TRUE(Remount());
    }
  }

  const timespec far_future{10'000'000'000, 0}, far_past{-10'000'000'000, 0};  // 2286, 1653
  timespec out_of_range[2] = {far_past, far_future};
  ASSERT_EQ(utimensat(AT_FDCWD, P("f").c_str(), out_of_range, 0), 0) << strerror(errno);
  struct stat st = Lstat(P("f"));
  EXPECT_GE(st.st_mtim.tv_sec, 9'223'372'036) << "wrapped around instead of clamped";  // 2262
  EXPECT_LE(st.st_mtim.tv_sec, far_future.tv_sec);
  EXPECT_GE(st.st_atim.tv_sec, far_past.tv_sec);
  EXPECT_LT(st.st_atim.tv_sec, -2'000'000'000) << "wrapped around instead of clamped";  // before 1907
}

// ------------------------------------------------------------------- mknod

TEST_F(NamespaceTest, MknodKindsPersist) {
  ASSERT_EQ(mknod(P("reg").c_str(), S_IFREG | 0640, 0), 0) << strerror(errno);
  ASSERT_EQ(mknod(P("fifo").c_str(), S_IFIFO | 0600, 0), 0) << strerror(errno);
  ASSERT_EQ(mknod(P("chr").c_str(), S_IFCHR | 0644, makedev(1, 3)), 0) << strerror(errno);
  ASSERT_EQ(mknod(P("blk").c_str(), S_IFBLK | 0600, makedev(259, 70000)), 0) << strerror(errno);
  EXPECT_EQ(Err(mknod(P("fifo").c_str(), S_IFIFO | 0600, 0)), EEXIST);

  auto check = [&] {
    struct stat reg = Lstat(P("reg")), fifo = Lstat(P("fifo")), chr = Lstat(P("chr")),
                blk = Lstat(P("blk"));
    EXPECT_EQ(reg.st_mode, S_IFREG | 0640);
    EXPECT_EQ(reg.st_size, 0);
    EXPECT_EQ(fifo.st_mode, S_IFIFO | 0600);
    EXPECT_EQ(chr.st_mode, S_IFCHR | 0644);
    EXPECT_EQ(chr.st_rdev, makedev(1, 3));
    EXPECT_EQ(blk.st_mode, S_IFBLK | 0600);
    EXPECT_EQ(blk.st_rdev, makedev(259, 70000));  // a large minor: the full dev_t must persist
  };
  check();
  ASSERT_TRUE(Remount());
  check();
  auto types = ListWithTypes(P(""));
  EXPECT_EQ(types["reg"], DT_REG);
  EXPECT_EQ(types["fifo"], DT_FIFO);
  EXPECT_EQ(types["chr"], DT_CHR);
  EXPECT_EQ(types["blk"], DT_BLK);
}

// ---------------------------------------------------------- mkdir / rmdir

TEST_F(NamespaceTest, MkdirRmdirErrors) {
  MakeDir(P("d"));
  MakeFile(P("d/f"));
  MakeFile(P("file"));
  EXPECT_EQ(Err(mkdir(P("d").c_str(), 0755)), EEXIST);
  EXPECT_EQ(Err(mkdir(P("file").c_str(), 0755)), EEXIST);
  EXPECT_EQ(Err(mkdir(P("missing/sub").c_str(), 0755)), ENOENT);
  EXPECT_EQ(Err(mkdir(P("file/sub").c_str(), 0755)), ENOTDIR);
  EXPECT_EQ(Err(rmdir(P("d").c_str())), ENOTEMPTY);
  EXPECT_EQ(Err(rmdir(P("file").c_str())), ENOTDIR);
  EXPECT_EQ(Err(rmdir(P("missing").c_str())), ENOENT);
  EXPECT_EQ(Err(rmdir(P("d/.").c_str())), EINVAL);
  EXPECT_EQ(Err(unlink(P("d").c_str())), EISDIR);
  EXPECT_TRUE(S_ISDIR(Lstat(P("d")).st_mode));  // the failed calls changed nothing

  ASSERT_EQ(unlink(P("d/f").c_str()), 0);
  ASSERT_EQ(rmdir(P("d").c_str()), 0);
  struct stat st{};
  EXPECT_EQ(Err(lstat(P("d").c_str(), &st)), ENOENT);
  EXPECT_EQ(List(P("")), std::vector<std::string>{"file"});
  ASSERT_TRUE(Remount());
  EXPECT_EQ(Err(lstat(P("d").c_str(), &st)), ENOENT);
  EXPECT_EQ(List(P("")), std::vector<std::string>{"file"});
}

TEST_F(NamespaceTest, UnlinkedOpenFileStaysUsable) {
  MakeFile(P("f"), 0644, 10);
  UniqueFd fd(open(P("f").c_str(), O_RDWR));
  ASSERT_TRUE(fd.ok());
  ASSERT_EQ(unlink(P("f").c_str()), 0);
  struct stat st{};
  EXPECT_EQ(Err(lstat(P("f").c_str(), &st)), ENOENT);
  EXPECT_EQ(Err(unlink(P("f").c_str())), ENOENT);
  EXPECT_TRUE(List(P("")).empty());
  ASSERT_EQ(fstat(fd.get(), &st), 0);
  EXPECT_EQ(st.st_nlink, 0u);
  EXPECT_EQ(st.st_size, 10);
  // The orphan still takes attribute changes through its descriptor.
  ASSERT_EQ(ftruncate(fd.get(), 20), 0) << strerror(errno);
  ASSERT_EQ(fchmod(fd.get(), 0600), 0) << strerror(errno);
  ASSERT_EQ(fstat(fd.get(), &st), 0);
  EXPECT_EQ(st.st_size, 20);
  EXPECT_EQ(st.st_mode, S_IFREG | 0600);
  fd.reset();
  ASSERT_TRUE(Remount());
  EXPECT_TRUE(List(P("")).empty());
}

// ----------------------------------------------------------------- symlinks

TEST_F(NamespaceTest, SymlinkReadlinkPersist) {
  const std::string long_target = std::string(1000, 'x') + "/end";
  MakeFile(P("target"), 0644, 4);
  ASSERT_EQ(symlink("target", P("rel").c_str()), 0);
  ASSERT_EQ(symlink("/no/such/place", P("dangling").c_str()), 0);
  ASSERT_EQ(symlink(long_target.c_str(), P("long").c_str()), 0);
  EXPECT_EQ(Err(symlink("x", P("rel").c_str())), EEXIST);
  char buf[16];
  EXPECT_EQ(Err(readlink(P("target").c_str(), buf, sizeof buf)), EINVAL);

  auto check = [&] {
    EXPECT_EQ(ReadLink(P("rel")), "target");
    EXPECT_EQ(ReadLink(P("dangling")), "/no/such/place");
    EXPECT_EQ(ReadLink(P("long")), long_target);
    struct stat l = Lstat(P("rel"));
    EXPECT_TRUE(S_ISLNK(l.st_mode));
    EXPECT_EQ(l.st_size, 6);  // a symlink's size is its target's length
    EXPECT_EQ(Lstat(P("long")).st_size, static_cast<off_t>(long_target.size()));
    struct stat t{};
    ASSERT_EQ(stat(P("rel").c_str(), &t), 0);  // follows to the target
    EXPECT_EQ(t.st_ino, Lstat(P("target")).st_ino);
    EXPECT_EQ(t.st_size, 4);
    EXPECT_EQ(Err(stat(P("dangling").c_str(), &t)), ENOENT);
  };
  check();
  ASSERT_TRUE(Remount());
  check();
  EXPECT_EQ(ListWithTypes(P(""))["rel"], DT_LNK);
}

// ------------------------------------------------------------------- links

TEST_F(NamespaceTest, HardLinkCountsPersist) {
  MakeFile(P("a"), 0644, 6);
  MakeDir(P("d"));
  MakeDir(P("sub"));
  ASSERT_EQ(link(P("a").c_str(), P("sub/b").c_str()), 0);
  EXPECT_EQ(Err(link(P("a").c_str(), P("sub/b").c_str())), EEXIST);
  EXPECT_EQ(Err(link(P("d").c_str(), P("d2").c_str())), EPERM);  // no hard links to dirs
  EXPECT_EQ(Err(link(P("missing").c_str(), P("m2").c_str())), ENOENT);

  auto check = [&](nlink_t n) {
    struct stat a = Lstat(P("a")), b = Lstat(P("sub/b"));
    EXPECT_EQ(a.st_ino, b.st_ino);
    EXPECT_EQ(a.st_nlink, n);
    EXPECT_EQ(b.st_nlink, n);
  };
  check(2);
  ASSERT_TRUE(Remount());
  check(2);
  EXPECT_EQ(SizeOf(P("sub/b")), 6);

  ASSERT_EQ(link(P("sub/b").c_str(), P("c").c_str()), 0);
  check(3);
  ASSERT_EQ(unlink(P("a").c_str()), 0);
  EXPECT_EQ(Lstat(P("sub/b")).st_nlink, 2u);
  ASSERT_TRUE(Remount());
  EXPECT_EQ(Lstat(P("sub/b")).st_nlink, 2u);
  EXPECT_EQ(Lstat(P("c")).st_nlink, 2u);
  EXPECT_EQ(SizeOf(P("c")), 6);
}

TEST_F(NamespaceTest, DirectoryNlinkCountsSubdirs) {
  MakeDir(P("d"));
  EXPECT_EQ(Lstat(P("d")).st_nlink, 2u);
  const nlink_t root_links = Lstat(P("")).st_nlink;
  for (const char* s : {"d/a", "d/b", "d/c"}) MakeDir(P(s));
  MakeFile(P("d/file"));  // files do not count
  ASSERT_EQ(symlink("a", P("d/link").c_str()), 0);
  EXPECT_EQ(Lstat(P("d")).st_nlink, 5u);
  EXPECT_EQ(Lstat(P("d/a")).st_nlink, 2u);
  ASSERT_EQ(rmdir(P("d/b").c_str()), 0);
  EXPECT_EQ(Lstat(P("d")).st_nlink, 4u);
  EXPECT_EQ(Lstat(P("")).st_nlink, root_links);
  ASSERT_TRUE(Remount());
  EXPECT_EQ(Lstat(P("d")).st_nlink, 4u);
  EXPECT_EQ(Lstat(P("d/c")).st_nlink, 2u);
}

// ------------------------------------------------------------------ rename

TEST_F(NamespaceTest, RenamePlainPersists) {
  MakeFile(P("a"), 0640, 7);
  const ino_t ino = Lstat(P("a")).st_ino;
  ASSERT_EQ(rename(P("a").c_str(), P("b").c_str()), 0);
  struct stat st{};
  EXPECT_EQ(Err(lstat(P("a").c_str(), &st)), ENOENT);
  EXPECT_EQ(Lstat(P("b")).st_ino, ino);
  EXPECT_EQ(Err(rename(P("a").c_str(), P("c").c_str())), ENOENT);
  ASSERT_EQ(rename(P("b").c_str(), P("b").c_str()), 0);  // same name: a no-op
  ASSERT_TRUE(Remount());
  EXPECT_EQ(List(P("")), std::vector<std::string>{"b"});
  EXPECT_EQ(Lstat(P("b")).st_ino, ino);
  EXPECT_EQ(SizeOf(P("b")), 7);
  EXPECT_EQ(Lstat(P("b")).st_mode, S_IFREG | 0640);
}

TEST_F(NamespaceTest, RenameOverFileDropsReplacedInode) {
  MakeFile(P("a"), 0644, 3);
  MakeFile(P("b"), 0644, 300);
  const ino_t a_ino = Lstat(P("a")).st_ino;
  UniqueFd old_fd(open(P("b").c_str(), O_RDONLY));
  ASSERT_TRUE(old_fd.ok());
  ASSERT_EQ(rename(P("a").c_str(), P("b").c_str()), 0);
  EXPECT_EQ(Lstat(P("b")).st_ino, a_ino);
  EXPECT_EQ(SizeOf(P("b")), 3);
  struct stat st{};
  ASSERT_EQ(fstat(old_fd.get(), &st), 0);
  EXPECT_EQ(st.st_nlink, 0u);  // the replaced inode has no name left
  old_fd.reset();
  // A replaced inode with another name only loses one link.
  MakeFile(P("c"), 0644, 1);
  MakeFile(P("victim"));
  ASSERT_EQ(link(P("victim").c_str(), P("victim2").c_str()), 0);
  ASSERT_EQ(rename(P("c").c_str(), P("victim").c_str()), 0);
  EXPECT_EQ(Lstat(P("victim2")).st_nlink, 1u);
  ASSERT_TRUE(Remount());
  EXPECT_EQ((List(P(""))), (std::vector<std::string>{"b", "victim", "victim2"}));
  EXPECT_EQ(Lstat(P("b")).st_ino, a_ino);
  EXPECT_EQ(SizeOf(P("victim")), 1);
  EXPECT_EQ(Lstat(P("victim2")).st_nlink, 1u);
}

TEST_F(NamespaceTest, RenameDirOverEmptyDir) {
  MakeDir(P("src"));
  MakeFile(P("src/inside"));
  MakeDir(P("dst"));
  const ino_t src_ino = Lstat(P("src")).st_ino;
  const nlink_t root_links = Lstat(P("")).st_nlink;
  ASSERT_EQ(rename(P("src").c_str(), P("dst").c_str()), 0) << strerror(errno);
  EXPECT_EQ(Lstat(P("dst")).st_ino, src_ino);
  EXPECT_EQ(List(P("dst")), std::vector<std::string>{"inside"});
  EXPECT_EQ(Lstat(P("")).st_nlink, root_links - 1);  // one subdir fewer
  ASSERT_TRUE(Remount());
  EXPECT_EQ(List(P("")), std::vector<std::string>{"dst"});
  EXPECT_EQ(Lstat(P("")).st_nlink, root_links - 1);
}

TEST_F(NamespaceTest, RenameErrors) {
  MakeDir(P("d"));
  MakeDir(P("full"));
  MakeFile(P("full/x"));
  MakeFile(P("f"));
  EXPECT_EQ(Err(rename(P("d").c_str(), P("full").c_str())), ENOTEMPTY);
  EXPECT_EQ(Err(rename(P("f").c_str(), P("d").c_str())), EISDIR);
  EXPECT_EQ(Err(rename(P("d").c_str(), P("f").c_str())), ENOTDIR);
  EXPECT_EQ(Err(rename(P("full").c_str(), P("full/sub").c_str())), EINVAL);  // into itself
  EXPECT_EQ(Err(rename(P("f").c_str(), P("missing/f").c_str())), ENOENT);
  // Nothing moved.
  EXPECT_EQ((List(P(""))), (std::vector<std::string>{"d", "f", "full"}));
  EXPECT_EQ(List(P("full")), std::vector<std::string>{"x"});
  EXPECT_TRUE(S_ISREG(Lstat(P("f")).st_mode));
}

TEST_F(NamespaceTest, RenameDirAcrossParentsPersists) {
  MakeDir(P("p1"));
  MakeDir(P("p2"));
  MakeDir(P("p1/d"));
  MakeFile(P("p1/d/f"), 0644, 7);
  const ino_t d_ino = Lstat(P("p1/d")).st_ino;
  ASSERT_EQ(rename(P("p1/d").c_str(), P("p2/moved").c_str()), 0);

  auto check = [&] {
    EXPECT_TRUE(List(P("p1")).empty());
    EXPECT_EQ(List(P("p2")), std::vector<std::string>{"moved"});
    EXPECT_EQ(Lstat(P("p2/moved")).st_ino, d_ino);
    EXPECT_EQ(Lstat(P("p2/moved/..")).st_ino, Lstat(P("p2")).st_ino);  // ".." follows the move
    EXPECT_EQ(Lstat(P("p1")).st_nlink, 2u);
    EXPECT_EQ(Lstat(P("p2")).st_nlink, 3u);
    EXPECT_EQ(SizeOf(P("p2/moved/f")), 7);
  };
  check();
  ASSERT_TRUE(Remount());
  check();
  // The moved dir can be removed from its new parent.
  ASSERT_EQ(unlink(P("p2/moved/f").c_str()), 0);
  ASSERT_EQ(rmdir(P("p2/moved").c_str()), 0);
  EXPECT_EQ(Lstat(P("p2")).st_nlink, 2u);
}

TEST_F(NamespaceTest, RenameNoreplace) {
  MakeFile(P("a"), 0644, 1);
  MakeFile(P("b"), 0644, 2);
  EXPECT_EQ(Err(renameat2(AT_FDCWD, P("a").c_str(), AT_FDCWD, P("b").c_str(), RENAME_NOREPLACE)),
            EEXIST);
  EXPECT_EQ(SizeOf(P("a")), 1);
  EXPECT_EQ(SizeOf(P("b")), 2);
  ASSERT_EQ(renameat2(AT_FDCWD, P("a").c_str(), AT_FDCWD, P("c").c_str(), RENAME_NOREPLACE), 0);
  EXPECT_EQ((List(P(""))), (std::vector<std::string>{"b", "c"}));
}

TEST_F(NamespaceTest, RenameExchangePersists) {
  MakeFile(P("a"), 0644, 1);
  MakeFile(P("b"), 0644, 2);
  MakeDir(P("p1"));
  MakeDir(P("p2"));
  MakeFile(P("p1/f"), 0644, 4);
  MakeDir(P("p2/d"));
  MakeFile(P("p2/d/inner"));
  const ino_t a = Lstat(P("a")).st_ino, b = Lstat(P("b")).st_ino;
  const ino_t f = Lstat(P("p1/f")).st_ino, d = Lstat(P("p2/d")).st_ino;
  ASSERT_EQ(renameat2(AT_FDCWD, P("a").c_str(), AT_FDCWD, P("b").c_str(), RENAME_EXCHANGE), 0)
      << strerror(errno);
  ASSERT_EQ(renameat2(AT_FDCWD, P("p1/f").c_str(), AT_FDCWD, P("p2/d").c_str(), RENAME_EXCHANGE),
            0)
      << strerror(errno);
  EXPECT_EQ(Err(renameat2(AT_FDCWD, P("a").c_str(), AT_FDCWD, P("missing").c_str(),
                          RENAME_EXCHANGE)),
            ENOENT);

  auto check = [&] {
    EXPECT_EQ(Lstat(P("a")).st_ino, b);
    EXPECT_EQ(Lstat(P("b")).st_ino, a);
    EXPECT_EQ(SizeOf(P("a")), 2);
    EXPECT_EQ(SizeOf(P("b")), 1);
    struct stat dir = Lstat(P("p1/f")), file = Lstat(P("p2/d"));
    EXPECT_EQ(dir.st_ino, d);
    EXPECT_TRUE(S_ISDIR(dir.st_mode));
    EXPECT_EQ(file.st_ino, f);
    EXPECT_TRUE(S_ISREG(file.st_mode));
    EXPECT_EQ(List(P("p1/f")), std::vector<std::string>{"inner"});
    EXPECT_EQ(Lstat(P("p1/f/..")).st_ino, Lstat(P("p1")).st_ino);
    EXPECT_EQ(Lstat(P("p1")).st_nlink, 3u);  // gained the subdir
    EXPECT_EQ(Lstat(P("p2")).st_nlink, 2u);  // lost it
    EXPECT_EQ(SizeOf(P("p2/d")), 4);
  };
  check();
  ASSERT_TRUE(Remount());
  check();
}

// ------------------------------------------------------------------ readdir

TEST_F(NamespaceTest, ReaddirListsExactlyTheEntries) {
  EXPECT_EQ(ListWithTypes(P("")).size(), 2u);  // "." and ".." only
  MakeDir(P("d"));
  auto empty = ListWithTypes(P("d"));
  EXPECT_EQ(empty.size(), 2u);
  EXPECT_EQ(empty.count("."), 1u);
  EXPECT_EQ(empty.count(".."), 1u);

  MakeFile(P("d/file"));
  MakeDir(P("d/sub"));
  ASSERT_EQ(symlink("file", P("d/link").c_str()), 0);
  ASSERT_EQ(mkfifo(P("d/fifo").c_str(), 0600), 0);
  MakeFile(P("d/gone"));
  ASSERT_EQ(unlink(P("d/gone").c_str()), 0);
  auto check = [&] {
    std::map<std::string, unsigned char> want{{".", DT_DIR},      {"..", DT_DIR},
                                              {"file", DT_REG},   {"sub", DT_DIR},
                                              {"link", DT_LNK},   {"fifo", DT_FIFO}};
    EXPECT_EQ(ListWithTypes(P("d")), want);
    // d_ino agrees with stat.
    DirPtr dir(opendir(P("d").c_str()));
    ASSERT_TRUE(dir);
    while (dirent* e = readdir(dir.get())) {
      if (std::string_view(e->d_name) == "..") continue;
      EXPECT_EQ(e->d_ino, Lstat(P("d/") + e->d_name).st_ino) << e->d_name;
    }
  };
  check();
  ASSERT_TRUE(Remount());
  check();
}

// Entries for the offset-stability tests: `keep_*` exist throughout, `gone_*`
// are deleted and `new_*` created while the directory is being read.
constexpr int kKeep = 500, kChurn = 100;

std::string Name(const char* prefix, int i) {
  char buf[32];
  snprintf(buf, sizeof buf, "%s_%03d", prefix, i);
  return buf;
}

void PopulateForChurn(const std::string& dir) {
  for (int i = 0; i < kKeep; ++i) {
    MakeFile(dir + "/" + Name("keep", i));
    if (i % 5 == 0) MakeFile(dir + "/" + Name("gone", i / 5));
  }
}

void Churn(const std::string& dir) {
  for (int i = 0; i < kChurn; ++i) {
    ASSERT_EQ(unlink((dir + "/" + Name("gone", i)).c_str()), 0);
    MakeFile(dir + "/" + Name("new", i));
  }
}

// Every keep_* exactly once; nothing (not even a churned name) twice.
void ExpectSeenOnce(const std::vector<std::string>& seen) {
  std::map<std::string, int> count;
  for (const auto& n : seen) ++count[n];
  for (const auto& [name, c] : count) EXPECT_EQ(c, 1) << name << " returned " << c << " times";
  for (int i = 0; i < kKeep; ++i) EXPECT_EQ(count.count(Name("keep", i)), 1u) << Name("keep", i) << " missing";
}

struct LinuxDirent64 {
  ino64_t d_ino;
  off64_t d_off;
  unsigned short d_reclen;
  unsigned char d_type;
  char d_name[];
};

// One getdents64 call with a small buffer: name and d_off (the offset of the
// entry after it) of each returned entry. Empty at end of directory.
std::vector<std::pair<std::string, off64_t>> Getdents(int fd) {
  alignas(8) char buf[1024];
  std::vector<std::pair<std::string, off64_t>> out;
  long n = syscall(SYS_getdents64, fd, buf, sizeof buf);
  if (n < 0) ADD_FAILURE() << "getdents64: " << strerror(errno);
  for (long pos = 0; pos < n;) {
    auto* e = reinterpret_cast<LinuxDirent64*>(buf + pos);
    out.emplace_back(e->d_name, e->d_off);
    pos += e->d_reclen;
  }
  return out;
}

TEST_F(NamespaceTest, GetdentsOffsetsSurviveChanges) {
  MakeDir(P("d"));
  PopulateForChurn(P("d"));
  UniqueFd fd(open(P("d").c_str(), O_RDONLY | O_DIRECTORY));
  ASSERT_TRUE(fd.ok());

  // Read ~250 entries; remember the offset after the 150th and keep only the
  // names before it: everything after is read again once we seek back.
  std::vector<std::pair<std::string, off64_t>> first;
  while (first.size() < 250) {
    auto batch = Getdents(fd.get());
    ASSERT_FALSE(batch.empty()) << "directory ended after " << first.size() << " entries";
    first.insert(first.end(), batch.begin(), batch.end());
  }
  const off64_t saved = first[149].second;
  std::vector<std::string> seen;
  for (int i = 0; i < 150; ++i) seen.push_back(first[i].first);

  Churn(P("d"));
  ASSERT_EQ(lseek64(fd.get(), saved, SEEK_SET), saved) << strerror(errno);
  for (auto batch = Getdents(fd.get()); !batch.empty(); batch = Getdents(fd.get())) {
    for (auto& [name, off] : batch) seen.push_back(name);
  }
  ExpectSeenOnce(seen);

  // A fresh listing shows exactly the new state.
  EXPECT_EQ(List(P("d")).size(), static_cast<size_t>(kKeep + kChurn));
  EXPECT_EQ(ListWithTypes(P("d")).count(Name("gone", 0)), 0u);
}

TEST_F(NamespaceTest, SeekdirOffsetsSurviveChanges) {
  MakeDir(P("d"));
  PopulateForChurn(P("d"));
  DirPtr dir(opendir(P("d").c_str()));
  ASSERT_TRUE(dir);
  std::vector<std::string> seen;
  long saved = -1;
  for (int i = 0; i < 250; ++i) {
    dirent* e = readdir(dir.get());
    ASSERT_NE(e, nullptr) << "directory ended after " << i << " entries";
    if (i < 150) seen.push_back(e->d_name);
    if (i == 149) saved = telldir(dir.get());
  }
  Churn(P("d"));
  seekdir(dir.get(), saved);
  errno = 0;
  while (dirent* e = readdir(dir.get())) seen.push_back(e->d_name);
  EXPECT_EQ(errno, 0) << strerror(errno);
  ExpectSeenOnce(seen);
  // And back to the start: rewinddir sees the new state exactly.
  rewinddir(dir.get());
  size_t n = 0;
  while (readdir(dir.get()) != nullptr) ++n;
  EXPECT_EQ(n, static_cast<size_t>(kKeep + kChurn + 2));
}

// `ls -l`: readdir then stat of each entry, from a cold cache (after a
// remount the attributes come from readdirplus / lookup, not from creation).
TEST_F(NamespaceTest, StatAfterReaddirManyEntries) {
  constexpr int kFiles = 300;
  MakeDir(P("d"));
  for (int i = 0; i < kFiles; ++i) {
    MakeFile(P("d/") + Name("f", i), 0600 | (i % 8) << 3, i);
  }
  ASSERT_TRUE(Remount());
  UniqueFd dfd(open(P("d").c_str(), O_RDONLY | O_DIRECTORY));
  ASSERT_TRUE(dfd.ok());
  std::set<std::string> seen;
  DirPtr dir(opendir(P("d").c_str()));
  ASSERT_TRUE(dir);
  while (dirent* e = readdir(dir.get())) {
    std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    struct stat st{};
    ASSERT_EQ(fstatat(dfd.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW), 0) << name;
    const int i = std::stoi(name.substr(2));
    EXPECT_EQ(st.st_size, i) << name;
    EXPECT_EQ(st.st_mode, S_IFREG | 0600 | (i % 8) << 3) << name;
    EXPECT_EQ(st.st_nlink, 1u) << name;
    EXPECT_EQ(st.st_ino, e->d_ino) << name;
    seen.insert(name);
  }
  EXPECT_EQ(seen.size(), static_cast<size_t>(kFiles));
}

// ------------------------------------------------------------------ statfs

TEST_F(NamespaceTest, StatfsGeometry) {
  struct statfs sf{};
  ASSERT_EQ(statfs(P("").c_str(), &sf), 0) << strerror(errno);
  EXPECT_EQ(sf.f_bsize, 4096);
  EXPECT_GT(sf.f_blocks, 0u);
  EXPECT_LE(sf.f_bfree, sf.f_blocks);
  EXPECT_LE(sf.f_bavail, sf.f_bfree);
  EXPECT_EQ(sf.f_namelen, 255);
  struct statvfs sv{};
  ASSERT_EQ(statvfs(P("").c_str(), &sv), 0);
  EXPECT_EQ(sv.f_namemax, 255u);
  EXPECT_GT(sv.f_blocks, 0u);
}

// df -i: the used inodes are the files that exist, not the numbers handed out.
TEST_F(NamespaceTest, StatfsCountsTheInodesInUse) {
  if (reference()) GTEST_SKIP() << "exact counts need a filesystem of its own";
  auto used = [&] {
    struct statvfs sv{};
    EXPECT_EQ(statvfs(P("").c_str(), &sv), 0) << strerror(errno);
    return sv.f_files - sv.f_ffree;
  };
  const auto before = used();
  for (int i = 0; i < 50; i++) MakeFile(P("f" + std::to_string(i)));
  MakeDir(P("d"));
  EXPECT_EQ(used(), before + 51);
  for (int i = 0; i < 50; i++) ASSERT_EQ(unlink(P("f" + std::to_string(i)).c_str()), 0);
  ASSERT_EQ(rmdir(P("d").c_str()), 0);
  // An unlinked inode goes when the kernel lets go of it, just after.
  EXPECT_TRUE(WaitUntil([&] { return used() == before; })) << used() << " in use, want " << before;
  MakeFile(P("kept"));
  MakeFile(P("replaced"));
  ASSERT_EQ(rename(P("kept").c_str(), P("replaced").c_str()), 0);  // the replaced inode goes
  ASSERT_EQ(rename(P("replaced").c_str(), P("kept").c_str()), 0);
  EXPECT_TRUE(WaitUntil([&] { return used() == before + 1; })) << used() << " in use, want " << before + 1;
  ASSERT_TRUE(Remount());
  EXPECT_EQ(used(), before + 1);
}

// ------------------------------------------------------------------ xattrs

// cp -p and mv copy a file's mode by setting its POSIX ACL, and chmod only
// if the filesystem refuses ACLs: the copy must keep the mode either way.
TEST_F(NamespaceTest, CopiesKeepTheirModes) {
  TempDir src("/tmp", "deferfs-cp");
  ASSERT_FALSE(src.path().empty());
  ASSERT_TRUE(RunCommand({"sh", "-c", "umask 022 && echo x > " + src / "f" + " && mkdir " + src / "d" +
                                          " && chmod 0751 " + src / "d" + " && chmod 0644 " + src / "f"})
                  .succeeded());
  ASSERT_TRUE(RunCommand({"cp", "-p", src / "f", P("f")}).succeeded());
  ASSERT_TRUE(RunCommand({"cp", "-a", src / "d", P("d")}).succeeded());
  EXPECT_EQ(Lstat(P("f")).st_mode, S_IFREG | 0644u);
  EXPECT_EQ(Lstat(P("d")).st_mode, S_IFDIR | 0751u);
  if (reference()) return;  // ext4 stores ACLs; deferfs refuses them
  // user::rw- group::r-- other::r-- (the kernel checks the format first).
  const uint8_t acl[] = {2, 0, 0, 0,                                  // version
                         0x01, 0, 6, 0, 0xff, 0xff, 0xff, 0xff,       // ACL_USER_OBJ
                         0x04, 0, 4, 0, 0xff, 0xff, 0xff, 0xff,       // ACL_GROUP_OBJ
                         0x20, 0, 4, 0, 0xff, 0xff, 0xff, 0xff};      // ACL_OTHER
  EXPECT_EQ(Err(setxattr(P("f").c_str(), "system.posix_acl_access", acl, sizeof acl, 0)), EOPNOTSUPP);
  char buf[64];
  EXPECT_EQ(Err(getxattr(P("f").c_str(), "system.posix_acl_access", buf, sizeof buf)), EOPNOTSUPP);
  EXPECT_EQ(Err(setxattr(P("d").c_str(), "system.posix_acl_default", acl, sizeof acl, 0)), EOPNOTSUPP);
  EXPECT_EQ(Err(setxattr(P("f").c_str(), "other.name", "x", 1, 0)), EOPNOTSUPP);
  EXPECT_EQ(Err(setxattr(P("f").c_str(), "user.", "x", 1, 0)), EINVAL);
}

TEST_F(NamespaceTest, XattrsPersist) {
  MakeFile(P("f"));
  MakeDir(P("d"));
  const std::string binary("\0\x01\xff value with NUL", 17);
  const std::string big(3000, 'v');
  ASSERT_EQ(setxattr(P("f").c_str(), "user.a", "hello", 5, 0), 0) << strerror(errno);
  ASSERT_EQ(setxattr(P("f").c_str(), "user.bin", binary.data(), binary.size(), XATTR_CREATE), 0);
  ASSERT_EQ(setxattr(P("f").c_str(), "user.empty", "", 0, 0), 0);
  ASSERT_EQ(setxattr(P("f").c_str(), "user.big", big.data(), big.size(), 0), 0);
  ASSERT_EQ(setxattr(P("d").c_str(), "user.dir", "D", 1, 0), 0);

  EXPECT_EQ(Err(setxattr(P("f").c_str(), "user.a", "x", 1, XATTR_CREATE)), EEXIST);
  EXPECT_EQ(Err(setxattr(P("f").c_str(), "user.nope", "x", 1, XATTR_REPLACE)), ENODATA);
  char buf[8];
  EXPECT_EQ(Err(getxattr(P("f").c_str(), "user.nope", buf, sizeof buf)), ENODATA);
  EXPECT_EQ(getxattr(P("f").c_str(), "user.a", nullptr, 0), 5);  // size query
  EXPECT_EQ(Err(getxattr(P("f").c_str(), "user.a", buf, 4)), ERANGE);
  EXPECT_EQ(Err(getxattr(P("f").c_str(), "user.big", buf, sizeof buf)), ERANGE);
  constexpr char kNames[] = "user.a\0user.bin\0user.empty\0user.big";  // + the final NUL
  const std::string names(kNames, sizeof kNames);
  EXPECT_EQ(listxattr(P("f").c_str(), nullptr, 0), static_cast<ssize_t>(names.size()));
  EXPECT_EQ(Err(listxattr(P("f").c_str(), buf, sizeof buf)), ERANGE);

  ASSERT_EQ(setxattr(P("f").c_str(), "user.a", "world!", 6, XATTR_REPLACE), 0);
  ASSERT_EQ(setxattr(P("f").c_str(), "user.gone", "g", 1, 0), 0);
  ASSERT_EQ(removexattr(P("f").c_str(), "user.gone"), 0);
  EXPECT_EQ(Err(removexattr(P("f").c_str(), "user.gone")), ENODATA);

  const std::map<std::string, std::string> want{
      {"user.a", "world!"}, {"user.bin", binary}, {"user.empty", ""}, {"user.big", big}};
  EXPECT_EQ(Xattrs(P("f")), want);
  ASSERT_TRUE(Remount());
  EXPECT_EQ(Xattrs(P("f")), want);
  EXPECT_EQ((Xattrs(P("d"))), (std::map<std::string, std::string>{{"user.dir", "D"}}));
  EXPECT_EQ(Err(getxattr(P("f").c_str(), "user.gone", buf, sizeof buf)), ENODATA);
}

// The kernel asks for "security.capability" before every buffered write
// (file_remove_privs): a file known to have no xattrs answers it, and any
// getxattr, without a store read. A file's first xattr, and xattrs from
// before a remount (when nothing is known yet), are found all the same.
TEST_F(NamespaceTest, GetxattrOfAFileWithoutXattrsReadsNoStore) {
  MakeFile(P("plain"));
  MakeFile(P("tagged"));
  MakeFile(P("untouched"));
  ASSERT_EQ(setxattr(P("tagged").c_str(), "user.k", "v", 1, 0), 0) << strerror(errno);
  auto buffered_writes = [&](const std::string& path) {
    UniqueFd fd(open(path.c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    for (off_t off = 0; off < 5; off++) ASSERT_EQ(pwrite(fd.get(), "x", 1, off), 1) << strerror(errno);
  };
  char buf[8];
  const Stats s0 = Stats::Read(*fs_);
  ASSERT_NO_FATAL_FAILURE(buffered_writes(P("plain")));
  EXPECT_EQ(Err(getxattr(P("plain").c_str(), "user.k", buf, sizeof buf)), ENODATA);
  EXPECT_EQ(Stats::Read(*fs_).Since(s0, "metadata.xattr_reads"), 0u);

  ASSERT_EQ(setxattr(P("plain").c_str(), "user.k", "first", 5, XATTR_CREATE), 0) << strerror(errno);
  EXPECT_EQ(getxattr(P("plain").c_str(), "user.k", buf, sizeof buf), 5);
  EXPECT_EQ(std::string(buf, 5), "first");

  ASSERT_TRUE(Remount());
  EXPECT_EQ(getxattr(P("tagged").c_str(), "user.k", buf, sizeof buf), 1) << strerror(errno);
  EXPECT_EQ(buf[0], 'v');
  EXPECT_EQ(getxattr(P("plain").c_str(), "user.k", buf, sizeof buf), 5) << strerror(errno);
  MakeFile(P("other"));
  const Stats s1 = Stats::Read(*fs_);
  ASSERT_NO_FATAL_FAILURE(buffered_writes(P("other")));  // new: known to have none
  const Stats s2 = Stats::Read(*fs_);
  EXPECT_EQ(s2.Since(s1, "metadata.xattr_reads"), 0u);
  ASSERT_NO_FATAL_FAILURE(buffered_writes(P("untouched")));  // read once, to learn it has none
  EXPECT_EQ(Stats::Read(*fs_).Since(s2, "metadata.xattr_reads"), 1u);
}

// ------------------------------------------------------------------- names

TEST_F(NamespaceTest, NameLengthLimits) {
  const std::string n255(255, 'a'), n256(256, 'b');
  MakeFile(P(n255), 0644, 3);
  MakeDir(P(std::string(255, 'd')));
  ASSERT_EQ(symlink("x", P(std::string(255, 's')).c_str()), 0);
  MakeFile(P("short"));
  ASSERT_EQ(rename(P("short").c_str(), P(std::string(255, 'r')).c_str()), 0);
  EXPECT_EQ(List(P("")).size(), 4u);
  EXPECT_EQ(SizeOf(P(n255)), 3);

  EXPECT_EQ(Err(open(P(n256).c_str(), O_CREAT | O_WRONLY, 0644)), ENAMETOOLONG);
  EXPECT_EQ(Err(mkdir(P(n256).c_str(), 0755)), ENAMETOOLONG);
  EXPECT_EQ(Err(rename(P(n255).c_str(), P(n256).c_str())), ENAMETOOLONG);
  EXPECT_EQ(Err(symlink("x", P(n256).c_str())), ENAMETOOLONG);
  EXPECT_EQ(Err(link(P(n255).c_str(), P(n256).c_str())), ENAMETOOLONG);
  EXPECT_EQ(Err(mknod(P(n256).c_str(), S_IFIFO | 0600, 0)), ENAMETOOLONG);
  struct stat st{};
  EXPECT_EQ(Err(lstat(P(n256).c_str(), &st)), ENAMETOOLONG);
  EXPECT_EQ(List(P("")).size(), 4u);  // nothing was created
  ASSERT_TRUE(Remount());
  EXPECT_EQ(SizeOf(P(n255)), 3);
  EXPECT_EQ(List(P("")).size(), 4u);
}

// -------------------------------------------------------- ownership, modes

TEST_F(NamespaceTest, NewInodesTakeCallerIds) {
  MakeDir(P("pub"), 0777);
  const int rc = RunAs(kNobody, kNogroup, [&] {
    UniqueFd fd(open(P("pub/file").c_str(), O_CREAT | O_WRONLY, 0644));
    if (!fd.ok()) return errno;
    if (mkdir(P("pub/dir").c_str(), 0755) != 0) return errno;
    if (symlink("file", P("pub/link").c_str()) != 0) return errno;
    if (mkfifo(P("pub/fifo").c_str(), 0644) != 0) return errno;
    return 0;
  });
  ASSERT_EQ(rc, 0) << strerror(rc);
  MakeFile(P("pub/rootfile"));
  auto check = [&] {
    for (const char* n : {"pub/file", "pub/dir", "pub/link", "pub/fifo"}) {
      struct stat st = Lstat(P(n));
      EXPECT_EQ(st.st_uid, kNobody) << n;
      EXPECT_EQ(st.st_gid, kNogroup) << n;
    }
    EXPECT_EQ(Lstat(P("pub/rootfile")).st_uid, 0u);
    EXPECT_EQ(Lstat(P("pub/rootfile")).st_gid, 0u);
  };
  check();
  ASSERT_TRUE(Remount());
  check();
}

TEST_F(NamespaceTest, UmaskApplies) {
  // umask is per process: apply it in a child (as root, uid/gid 0).
  const int rc = RunAs(0, 0, [&] {
    umask(022);
    UniqueFd fd(open(P("f644").c_str(), O_CREAT | O_WRONLY, 0666));
    if (!fd.ok() || mkdir(P("d755").c_str(), 0777) != 0) return errno;
    umask(077);
    UniqueFd fd2(open(P("f600").c_str(), O_CREAT | O_WRONLY, 0666));
    if (!fd2.ok() || mknod(P("fifo600").c_str(), S_IFIFO | 0666, 0) != 0) return errno;
    return 0;
  });
  ASSERT_EQ(rc, 0) << strerror(rc);
  auto check = [&] {
    EXPECT_EQ(Lstat(P("f644")).st_mode, S_IFREG | 0644);
    EXPECT_EQ(Lstat(P("d755")).st_mode, S_IFDIR | 0755);
    EXPECT_EQ(Lstat(P("f600")).st_mode, S_IFREG | 0600);
    EXPECT_EQ(Lstat(P("fifo600")).st_mode, S_IFIFO | 0600);
  };
  check();
  ASSERT_TRUE(Remount());
  check();
}

TEST_F(NamespaceTest, SetgidDirectoryInheritance) {
  constexpr gid_t kGroup = 4321;
  MakeDir(P("sg"), 0777);
  ASSERT_EQ(chown(P("sg").c_str(), 0, kGroup), 0);
  ASSERT_EQ(chmod(P("sg").c_str(), 02777), 0);
  MakeFile(P("sg/rootfile"));
  ASSERT_EQ(mkdir(P("sg/sub").c_str(), 0755), 0);
  const int rc = RunAs(kNobody, kNogroup, [&] {
    UniqueFd fd(open(P("sg/nobodyfile").c_str(), O_CREAT | O_WRONLY, 0644));
    return fd.ok() ? 0 : errno;
  });
  ASSERT_EQ(rc, 0) << strerror(rc);
  auto check = [&] {
    EXPECT_EQ(Lstat(P("sg/rootfile")).st_gid, kGroup);
    EXPECT_EQ(Lstat(P("sg/nobodyfile")).st_gid, kGroup);
    EXPECT_EQ(Lstat(P("sg/nobodyfile")).st_uid, kNobody);
    struct stat sub = Lstat(P("sg/sub"));
    EXPECT_EQ(sub.st_gid, kGroup);
    EXPECT_TRUE(sub.st_mode & S_ISGID) << std::oct << sub.st_mode;
    EXPECT_FALSE(Lstat(P("sg/rootfile")).st_mode & S_ISGID);
  };
  check();
  ASSERT_TRUE(Remount());
  check();
}

// -------------------------------------------------------------- timestamps

TEST_F(NamespaceTest, CreateAndUnlinkUpdateParentTimes) {
  MakeDir(P("d"));
  MakeDir(P("other"));
  auto expect_parent_changed = [&](const char* what, const std::function<void()>& op) {
    SCOPED_TRACE(what);
    struct stat before = Lstat(P("d"));
    Tick();
    op();
    struct stat after = Lstat(P("d"));
    EXPECT_TRUE(Later(before.st_mtim, after.st_mtim)) << "mtime";
    EXPECT_TRUE(Later(before.st_ctim, after.st_ctim)) << "ctime";
  };
  expect_parent_changed("create", [&] { MakeFile(P("d/f")); });
  expect_parent_changed("mkdir", [&] { MakeDir(P("d/sub")); });
  expect_parent_changed("symlink", [&] { ASSERT_EQ(symlink("f", P("d/l").c_str()), 0); });
  expect_parent_changed("mknod", [&] { ASSERT_EQ(mkfifo(P("d/p").c_str(), 0600), 0); });
  expect_parent_changed("link", [&] { ASSERT_EQ(link(P("d/f").c_str(), P("d/f2").c_str()), 0); });
  expect_parent_changed("unlink", [&] { ASSERT_EQ(unlink(P("d/f2").c_str()), 0); });
  expect_parent_changed("rmdir", [&] { ASSERT_EQ(rmdir(P("d/sub").c_str()), 0); });
  expect_parent_changed("rename within", [&] { ASSERT_EQ(rename(P("d/l").c_str(), P("d/l2").c_str()), 0); });
  expect_parent_changed("rename out", [&] { ASSERT_EQ(rename(P("d/p").c_str(), P("other/p").c_str()), 0); });
  expect_parent_changed("rename in", [&] { ASSERT_EQ(rename(P("other/p").c_str(), P("d/p").c_str()), 0); });
}

TEST_F(NamespaceTest, ChmodUpdatesCtimeOnly) {
  MakeFile(P("f"));
  const timespec past{1'000'000'000, 5};
  timespec ts[2] = {past, past};
  ASSERT_EQ(utimensat(AT_FDCWD, P("f").c_str(), ts, 0), 0);
  struct stat before = Lstat(P("f")), dir_before = Lstat(P(""));
  Tick();
  ASSERT_EQ(chmod(P("f").c_str(), 0600), 0);
  struct stat after = Lstat(P("f"));
  EXPECT_TRUE(Later(before.st_ctim, after.st_ctim));
  EXPECT_TRUE(Same(past, after.st_mtim));
  EXPECT_TRUE(Same(past, after.st_atim));
  EXPECT_TRUE(Same(dir_before.st_mtim, Lstat(P("")).st_mtim));  // the parent is untouched
  Tick();
  ASSERT_EQ(chown(P("f").c_str(), 7, 7), 0);
  struct stat after_chown = Lstat(P("f"));
  EXPECT_TRUE(Later(after.st_ctim, after_chown.st_ctim));
  EXPECT_TRUE(Same(past, after_chown.st_mtim));
  ASSERT_TRUE(Remount());
  EXPECT_TRUE(Same(after_chown.st_ctim, Lstat(P("f")).st_ctim));  // ctime persists too
}

// A truncate to the same size is a change too, as on ext4: the kernel sends
// open(O_TRUNC) and ftruncate's SETATTR without a time and leaves mtime to
// the server.
TEST_F(NamespaceTest, TruncateToTheSameSizeUpdatesMtime) {
  MakeFile(P("f"));
  const timespec past{1'000'000'000, 5};
  auto expect_mtime_moves = [&](const char* what, off_t size, const std::function<void()>& op) {
    SCOPED_TRACE(what);
    timespec ts[2] = {past, past};
    ASSERT_EQ(utimensat(AT_FDCWD, P("f").c_str(), ts, 0), 0) << strerror(errno);
    const struct stat before = Lstat(P("f"));
    ASSERT_TRUE(Same(past, before.st_mtim));
    Tick();
    op();
    const struct stat after = Lstat(P("f"));
    EXPECT_EQ(after.st_size, size);
    EXPECT_TRUE(Later(past, after.st_mtim)) << "mtime";
    EXPECT_TRUE(Later(before.st_ctim, after.st_ctim)) << "ctime";
    EXPECT_TRUE(Same(past, after.st_atim)) << "atime";
  };
  expect_mtime_moves("open O_TRUNC of an empty file", 0, [&] {
    UniqueFd fd(open(P("f").c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
  });
  ASSERT_EQ(truncate(P("f").c_str(), 3), 0);
  expect_mtime_moves("ftruncate", 3, [&] {
    UniqueFd fd(open(P("f").c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(ftruncate(fd.get(), 3), 0) << strerror(errno);
  });
  expect_mtime_moves("truncate by path", 3, [&] { ASSERT_EQ(truncate(P("f").c_str(), 3), 0) << strerror(errno); });
  const struct stat last = Lstat(P("f"));
  ASSERT_TRUE(Remount());
  EXPECT_TRUE(Same(last.st_mtim, Lstat(P("f")).st_mtim)) << "after remount";
}

TEST_F(NamespaceTest, LinkAndUnlinkUpdateTargetCtime) {
  MakeFile(P("f"));
  const timespec past{1'000'000'000, 5};
  timespec ts[2] = {past, past};
  ASSERT_EQ(utimensat(AT_FDCWD, P("f").c_str(), ts, 0), 0);
  struct stat s0 = Lstat(P("f"));
  Tick();
  ASSERT_EQ(link(P("f").c_str(), P("g").c_str()), 0);
  struct stat s1 = Lstat(P("f"));
  EXPECT_TRUE(Later(s0.st_ctim, s1.st_ctim)) << "link";
  EXPECT_TRUE(Same(past, s1.st_mtim));
  Tick();
  ASSERT_EQ(unlink(P("g").c_str()), 0);
  struct stat s2 = Lstat(P("f"));
  EXPECT_TRUE(Later(s1.st_ctim, s2.st_ctim)) << "unlink";
  EXPECT_TRUE(Same(past, s2.st_mtim));
}

// ------------------------------------------------------------- permissions

TEST_F(NamespaceTest, PermissionsAsNonRoot) {
  MakeDir(P("closed"), 0755);
  MakeFile(P("secret"), 0600);
  MakeFile(P("rootfile"), 0666);
  MakeFile(P("readonly"), 0644);
  MakeDir(P("sticky"), 01777);
  MakeFile(P("sticky/roots"), 0666);
  MakeFile(P("sticky/others"), 0666);
  ASSERT_EQ(chown(P("sticky/others").c_str(), 1000, 1000), 0);

  auto as_nobody = [&](const std::function<int()>& fn) { return RunAs(kNobody, kNogroup, fn); };
  EXPECT_EQ(as_nobody([&] { return Err(open(P("closed/new").c_str(), O_CREAT | O_WRONLY, 0644)); }), EACCES);
  EXPECT_EQ(as_nobody([&] { return Err(mkdir(P("closed/dir").c_str(), 0755)); }), EACCES);
  EXPECT_EQ(as_nobody([&] { return Err(open(P("secret").c_str(), O_RDONLY)); }), EACCES);
  EXPECT_EQ(as_nobody([&] { return Err(open(P("readonly").c_str(), O_WRONLY)); }), EACCES);
  EXPECT_EQ(as_nobody([&] { return Err(chmod(P("rootfile").c_str(), 0777)); }), EPERM);
  EXPECT_EQ(as_nobody([&] { return Err(chown(P("rootfile").c_str(), kNobody, kNogroup)); }), EPERM);
  EXPECT_EQ(as_nobody([&] { return Err(setxattr(P("readonly").c_str(), "user.x", "1", 1, 0)); }), EACCES);
  EXPECT_EQ(as_nobody([&] { return Err(unlink(P("sticky/roots").c_str())); }), EPERM);
  EXPECT_EQ(as_nobody([&] { return Err(unlink(P("sticky/others").c_str())); }), EPERM);
  EXPECT_EQ(as_nobody([&] { return Err(rename(P("sticky/others").c_str(), P("sticky/mine").c_str())); }), EPERM);
  // What the user may do still works: read a 0644 file, create and delete
  // its own file in the sticky dir, chmod its own file.
  EXPECT_EQ(as_nobody([&] { return Err(open(P("readonly").c_str(), O_RDONLY)); }), 0);
  EXPECT_EQ(as_nobody([&] {
              UniqueFd fd(open(P("sticky/mine").c_str(), O_CREAT | O_WRONLY, 0644));
              if (!fd.ok()) return errno;
              if (fchmod(fd.get(), 0600) != 0) return errno;
              return Err(unlink(P("sticky/mine").c_str()));
            }),
            0);
  // Nothing changed.
  struct stat st{};
  EXPECT_EQ(Err(lstat(P("closed/new").c_str(), &st)), ENOENT);
  EXPECT_EQ(Lstat(P("rootfile")).st_mode, S_IFREG | 0666);
  EXPECT_EQ(Lstat(P("rootfile")).st_uid, 0u);
  EXPECT_EQ((List(P("sticky"))), (std::vector<std::string>{"others", "roots"}));
}

// ----------------------------------------------------------- open/release

TEST_F(NamespaceTest, ManyOpenFiles) {
  constexpr int kFiles = 300;
  {
    std::vector<UniqueFd> fds;
    for (int i = 0; i < kFiles; ++i) {
      fds.emplace_back(open(P(Name("f", i)).c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644));
      ASSERT_TRUE(fds.back().ok()) << i << ": " << strerror(errno);
    }
    for (int i = 0; i < kFiles; ++i) ASSERT_EQ(ftruncate(fds[i].get(), i), 0) << i << ": " << strerror(errno);
    // The same file open many times at once.
    std::vector<UniqueFd> same;
    for (int i = 0; i < 100; ++i) {
      same.emplace_back(open(P("f_000").c_str(), O_RDONLY | O_CLOEXEC));
      ASSERT_TRUE(same.back().ok());
    }
    ASSERT_EQ(ftruncate(fds[0].get(), 4242), 0);
    struct stat st{};
    ASSERT_EQ(fstat(same.back().get(), &st), 0);
    EXPECT_EQ(st.st_size, 4242);
  }  // all released here
  // Every release reached the file system: the unmount is not busy.
  ASSERT_TRUE(Remount());
  for (int i = 1; i < kFiles; ++i) EXPECT_EQ(SizeOf(P(Name("f", i))), i);
  EXPECT_EQ(SizeOf(P("f_000")), 4242);
  EXPECT_EQ(List(P("")).size(), static_cast<size_t>(kFiles));
}

// A close costs the daemon its RELEASE only: deferfs has nothing to do at
// FLUSH, so it declines the first one and the kernel sends no more.
TEST_F(NamespaceTest, CloseSendsNoFlush) {
  MakeFile(P("f"));
  constexpr uint64_t kOpens = 50;
  auto requests = [&] { return Stats::Read(*fs_)["fuse.dev_requests"]; };
  auto open_files = [&] { return Stats::Read(*fs_)["live.open_files"]; };
  auto open_close = [&] {
    UniqueFd fd(open(P("f").c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
  };
  ASSERT_NO_FATAL_FAILURE(open_close());  // the connection's first FLUSH, if any
  ASSERT_TRUE(WaitUntil([&] { return open_files() == 0; }, 30s));
  // What reading the stats costs: the least of three (a cached attribute
  // running out adds a GETATTR now and then, never less).
  uint64_t per_read = UINT64_MAX;
  for (uint64_t i = 0, last = requests(); i < 3; i++) {
    const uint64_t now = requests();
    per_read = std::min(per_read, now - last);
    last = now;
  }
  const uint64_t r1 = requests();
  for (uint64_t i = 0; i < kOpens; i++) ASSERT_NO_FATAL_FAILURE(open_close());
  uint64_t reads = 0;  // of the stats, while the releases trail the closes
  ASSERT_TRUE(WaitUntil([&] { reads++; return open_files() == 0; }, 30s));
  const uint64_t served = requests() - r1 - (reads + 1) * per_read;
  // An OPEN and a RELEASE per open and close; a FLUSH each would make it
  // 3 * kOpens. The slack is for lookups and getattrs whose 1 s cache ran out.
  EXPECT_GE(served, 2 * kOpens);
  EXPECT_LE(served, 2 * kOpens + 10) << "the kernel still sends FLUSH";
}

// ----------------------------------------------------- whole-tree persistence

// Everything observable about one name, as a comparable string.
std::string Describe(const std::string& p) {
  struct stat st = Lstat(p);
  std::ostringstream os;
  os << "mode=" << std::oct << st.st_mode << std::dec << " uid=" << st.st_uid << " gid=" << st.st_gid
     << " size=" << st.st_size << " nlink=" << st.st_nlink << " rdev=" << st.st_rdev
     << " mtime=" << Ns(st.st_mtim);
  if (S_ISLNK(st.st_mode)) os << " target=" << ReadLink(p);
  if (S_ISREG(st.st_mode) || S_ISDIR(st.st_mode)) {
    for (const auto& [k, v] : Xattrs(p)) os << " " << k << "=" << v;
  }
  return os.str();
}

std::map<std::string, std::string> Snapshot(const std::string& root) {
  std::map<std::string, std::string> out;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(root, ec);
       it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) {
      ADD_FAILURE() << "walking " << root << ": " << ec.message();
      break;
    }
    out[it->path().lexically_relative(root).string()] = Describe(it->path().string());
  }
  return out;
}

TEST_F(NamespaceTest, TreeSurvivesRemount) {
  MakeDir(P("a"), 0750);
  MakeDir(P("a/b"), 02775);
  MakeDir(P("a/b/c"));
  MakeDir(P("empty"), 0700);
  MakeFile(P("a/b/c/deep"), 0600, 5000);
  MakeFile(P("top"), 0644, 5);
  MakeFile(P("a/exec"), 0755, 10);
  ASSERT_EQ(link(P("top").c_str(), P("a/b/top.hard").c_str()), 0);
  ASSERT_EQ(symlink("../top", P("a/up").c_str()), 0);
  ASSERT_EQ(mkfifo(P("a/b/fifo").c_str(), 0640), 0);
  ASSERT_EQ(mknod(P("chr").c_str(), S_IFCHR | 0600, makedev(4, 64)), 0);
  ASSERT_EQ(truncate(P("a/exec").c_str(), 1 << 20), 0);
  ASSERT_EQ(chown(P("a/b/c/deep").c_str(), 1001, 1002), 0);
  ASSERT_EQ(lchown(P("a/up").c_str(), 1003, 1004), 0);
  ASSERT_EQ(chown(P("a").c_str(), 1000, 1000), 0);
  ASSERT_EQ(setxattr(P("a").c_str(), "user.tag", "dir a", 5, 0), 0);
  ASSERT_EQ(setxattr(P("top").c_str(), "user.one", "1", 1, 0), 0);
  ASSERT_EQ(setxattr(P("top").c_str(), "user.two", "22", 2, 0), 0);
  for (int i = 0; i < 40; ++i) MakeFile(P("a/b/c/") + Name("n", i), 0644, i * 100);

  auto before = Snapshot(P(""));
  ASSERT_EQ(before.size(), 51u);  // the walk saw the whole tree
  ASSERT_TRUE(Remount());
  auto after = Snapshot(P(""));
  for (const auto& [name, desc] : before) {
    auto it = after.find(name);
    if (it == after.end()) {
      ADD_FAILURE() << name << " lost after remount";
    } else {
      EXPECT_EQ(it->second, desc) << name;
    }
  }
  for (const auto& [name, desc] : after) {
    EXPECT_TRUE(before.count(name)) << name << " appeared after remount";
  }
  EXPECT_EQ(Lstat(P("top")).st_nlink, 2u);
}

}  // namespace
}  // namespace deferfs_test
