// `-o ro`: the kernel refuses every change with EROFS, reads still work, and
// the daemon writes nothing: not a commit (the next read-write mount sees the
// same tree), not a byte of the metadata directory.
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <utility>

#include <gtest/gtest.h>

#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using namespace std::chrono_literals;

// A background `deferfs mount` of `img` at `mnt` (MountedFs cannot be used:
// it prepares the root of a fresh mount by writing to it), unmounted and its
// daemon gone on destruction.
class BackgroundMount {
 public:
  BackgroundMount(std::string img, std::string mnt, const std::string& opts) : img_(std::move(img)), mnt_(std::move(mnt)) {
    RunResult r = RunDeferfs({"mount", img_, mnt_, "-o", opts}, 30s);
    ok_ = r.succeeded() && IsLiveMount(mnt_);
    if (!ok_) ADD_FAILURE() << "deferfs mount -o " << opts << ": " << r.Describe();
  }
  ~BackgroundMount() {
    if (IsMounted(mnt_) && !RunCommand({"fusermount3", "-u", mnt_}).succeeded()) RunCommand({"umount", "-l", mnt_});
    if (!WaitUntil([&] { return TryFlock(img_) == 0; })) ADD_FAILURE() << "the daemon did not exit";
  }
  bool ok() const { return ok_; }
  std::string path(const std::string& name) const { return mnt_ + "/" + name; }

 private:
  std::string img_, mnt_;
  bool ok_ = false;
};

// Every file of a directory with its modification time and contents.
std::map<std::string, std::string> Snapshot(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    struct stat st{};
    if (lstat(e.path().c_str(), &st) != 0) {
      ADD_FAILURE() << e.path() << ": " << strerror(errno);
      continue;
    }
    std::ifstream in(e.path(), std::ios::binary);
    std::ostringstream bytes;
    bytes << in.rdbuf();
    files[e.path().filename()] =
        std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec) + " " + bytes.str();
  }
  return files;
}

TEST(ReadOnlyMountTest, RefusesChangesWithErofsAndServesReads) {
  if (getenv("DEFERFS_TEST_DIR") != nullptr) GTEST_SKIP() << "needs deferfs itself";
  TempDir tmp;
  const std::string img = tmp / "fs.img";
  RunResult mkfs = RunDeferfs({"mkfs", img, "--size", "64M"});
  ASSERT_TRUE(mkfs.succeeded()) << mkfs.Describe();
  struct stat before{};
  {
    MountedFs rw(MountConfig::Existing(img));
    ASSERT_TRUE(rw.ok());
    UniqueFd fd(open(rw.path("f").c_str(), O_CREAT | O_RDWR, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(pwrite(fd.get(), "hello", 5, 0), 5);
    ASSERT_EQ(fsync(fd.get()), 0);
    ASSERT_EQ(mkdir(rw.path("d").c_str(), 0755), 0);
    ASSERT_EQ(lstat(rw.path("f").c_str(), &before), 0);
  }

  const std::string mnt = tmp / "mnt";
  ASSERT_EQ(mkdir(mnt.c_str(), 0755), 0);
  const std::string meta = img + ".meta";  // the default next to a backing file
  const std::map<std::string, std::string> meta_before = Snapshot(meta);
  ASSERT_FALSE(meta_before.empty());
  {
    BackgroundMount ro(img, mnt, "ro");
    ASSERT_TRUE(ro.ok());
    const std::string f = ro.path("f"), d = ro.path("d");
    char buf[8] = {};
    {
      UniqueFd fd(open(f.c_str(), O_RDONLY));
      ASSERT_TRUE(fd.ok()) << strerror(errno);
      EXPECT_EQ(pread(fd.get(), buf, sizeof(buf), 0), 5);
      EXPECT_STREQ(buf, "hello");
      EXPECT_EQ(fsync(fd.get()), 0) << strerror(errno);
    }
    RunResult stats = RunDeferfs({"stats", mnt, "--json"});
    EXPECT_NE(stats.out.find("\"device_flushes\":0"), std::string::npos)
        << "an fsync on a read-only mount flushed the backing device: " << stats.Describe();
    EXPECT_EQ(Err(open(f.c_str(), O_WRONLY)), EROFS);
    EXPECT_EQ(Err(open(f.c_str(), O_RDWR)), EROFS);
    EXPECT_EQ(Err(open(f.c_str(), O_RDONLY | O_TRUNC)), EROFS);
    EXPECT_EQ(Err(open(ro.path("new").c_str(), O_CREAT | O_WRONLY, 0644)), EROFS);
    EXPECT_EQ(Err(mkdir(ro.path("d2").c_str(), 0755)), EROFS);
    EXPECT_EQ(Err(unlink(f.c_str())), EROFS);
    EXPECT_EQ(Err(rmdir(d.c_str())), EROFS);
    EXPECT_EQ(Err(rename(f.c_str(), ro.path("g").c_str())), EROFS);
    EXPECT_EQ(Err(symlink("f", ro.path("s").c_str())), EROFS);
    EXPECT_EQ(Err(link(f.c_str(), ro.path("h").c_str())), EROFS);
    EXPECT_EQ(Err(chmod(f.c_str(), 0600)), EROFS);
    EXPECT_EQ(Err(chown(f.c_str(), 1, 1)), EROFS);
    EXPECT_EQ(Err(truncate(f.c_str(), 0)), EROFS);
    EXPECT_EQ(Err(utimensat(AT_FDCWD, f.c_str(), nullptr, 0)), EROFS);
    EXPECT_EQ(Err(setxattr(f.c_str(), "user.k", "v", 1, 0)), EROFS);
    std::ifstream mounts("/proc/self/mounts");
    bool found = false;
    for (std::string line; std::getline(mounts, line);) {
      if (line.find(" " + mnt + " ") == std::string::npos) continue;
      found = true;
      EXPECT_NE(line.find(" ro,"), std::string::npos) << "not mounted read-only: " << line;
    }
    EXPECT_TRUE(found);
  }

  // Not a file of the metadata directory was added, removed or touched.
  const std::map<std::string, std::string> meta_after = Snapshot(meta);
  EXPECT_EQ(meta_after.size(), meta_before.size());
  for (const auto& [name, file] : meta_before) {
    auto it = meta_after.find(name);
    if (it == meta_after.end()) ADD_FAILURE() << "the ro mount removed " << name;
    else EXPECT_TRUE(it->second == file) << "the ro mount changed " << name;
  }
  for (const auto& [name, file] : meta_after) {
    if (!meta_before.count(name)) ADD_FAILURE() << "the ro mount created " << name;
  }

  // Nothing changed: same file, same times, same size.
  MountedFs rw(MountConfig::Existing(img));
  ASSERT_TRUE(rw.ok());
  struct stat after{};
  ASSERT_EQ(lstat(rw.path("f").c_str(), &after), 0);
  EXPECT_EQ(after.st_size, 5);
  EXPECT_EQ(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
  EXPECT_EQ(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);
  EXPECT_EQ(after.st_ctim.tv_nsec, before.st_ctim.tv_nsec);
}

// The kernel's ro flag is not ours to trust: mount(2) with MS_REMOUNT (as
// `mount -i -o remount,rw`) drops it without asking the daemon. The daemon
// still refuses every change, and does not shut down over it.
TEST(ReadOnlyMountTest, RemountedReadWriteBehindItsBackStillRefusesChanges) {
  if (getenv("DEFERFS_TEST_DIR") != nullptr) GTEST_SKIP() << "needs deferfs itself";
  TempDir tmp;
  const std::string img = tmp / "fs.img";
  RunResult mkfs = RunDeferfs({"mkfs", img, "--size", "64M"});
  ASSERT_TRUE(mkfs.succeeded()) << mkfs.Describe();
  const std::string data(4096, 'a');
  {
    MountedFs rw(MountConfig::Existing(img));
    ASSERT_TRUE(rw.ok());
    UniqueFd fd(open(rw.path("f").c_str(), O_CREAT | O_RDWR, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(pwrite(fd.get(), data.data(), data.size(), 0), 4096);
    ASSERT_EQ(fsync(fd.get()), 0);
  }

  const std::string mnt = tmp / "mnt";
  ASSERT_EQ(mkdir(mnt.c_str(), 0755), 0);
  {
    BackgroundMount ro(img, mnt, "ro");
    ASSERT_TRUE(ro.ok());
    ASSERT_EQ(mount(nullptr, mnt.c_str(), nullptr, MS_REMOUNT, nullptr), 0) << strerror(errno);
    const std::string f = ro.path("f");
    EXPECT_EQ(Err(open(f.c_str(), O_RDWR | O_DIRECT)), EROFS);
    EXPECT_EQ(Err(open(f.c_str(), O_WRONLY)), EROFS);
    EXPECT_EQ(Err(open(f.c_str(), O_RDONLY | O_TRUNC)), EROFS);
    EXPECT_EQ(Err(open(ro.path("new").c_str(), O_CREAT | O_WRONLY, 0644)), EROFS);
    EXPECT_EQ(Err(mkdir(ro.path("d").c_str(), 0755)), EROFS);
    EXPECT_EQ(Err(mknod(ro.path("p").c_str(), S_IFIFO | 0644, 0)), EROFS);
    EXPECT_EQ(Err(symlink("f", ro.path("s").c_str())), EROFS);
    EXPECT_EQ(Err(link(f.c_str(), ro.path("h").c_str())), EROFS);
    EXPECT_EQ(Err(rename(f.c_str(), ro.path("g").c_str())), EROFS);
    EXPECT_EQ(Err(chmod(f.c_str(), 0600)), EROFS);
    EXPECT_EQ(Err(truncate(f.c_str(), 0)), EROFS);
    EXPECT_EQ(Err(setxattr(f.c_str(), "user.k", "v", 1, 0)), EROFS);
    EXPECT_EQ(Err(removexattr(f.c_str(), "user.k")), EROFS);
    EXPECT_EQ(Err(unlink(f.c_str())), EROFS);
    // The refusals did not shut the filesystem down (reads would survive
    // that; fsync would not).
    UniqueFd fd(open(f.c_str(), O_RDONLY));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    EXPECT_EQ(fsync(fd.get()), 0) << strerror(errno);
    std::string back(4096, '\0');
    EXPECT_EQ(pread(fd.get(), back.data(), back.size(), 0), 4096);
    EXPECT_EQ(back, data);
  }

  MountedFs rw(MountConfig::Existing(img));
  ASSERT_TRUE(rw.ok());
  std::ifstream in(rw.path("f"), std::ios::binary);
  std::ostringstream bytes;
  bytes << in.rdbuf();
  EXPECT_EQ(bytes.str(), data);
  EXPECT_EQ(Err(access(rw.path("g").c_str(), F_OK)), ENOENT);
}

}  // namespace
}  // namespace deferfs_test
