// mount(8), umount(8) and fstab lines of type fuse.deferfs, through the
// mount.fuse.deferfs helper that `cmake --install` put into a temporary root.
//
// mount(8) runs helpers only from /sbin. Rather than put a file into the
// machine's /sbin, each test enters a private mount namespace and
// bind-mounts the temporary root's usr/sbin over /usr/sbin there: the real
// mount(8) finds the installed helper, nothing outside this process sees the
// change, and the namespace (with anything still mounted in it) goes away
// with the test process and the daemons it started.
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using namespace std::chrono_literals;

// Enters a private mount namespace with `sbin` bind-mounted over /usr/sbin;
// returns this process to its original namespace (and directory) on
// destruction.
class PrivateSbin {
 public:
  explicit PrivateSbin(const std::string& sbin) : orig_(open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC)) {
    char cwd[PATH_MAX];
    if (getcwd(cwd, sizeof(cwd)) != nullptr) cwd_ = cwd;
    if (!orig_.ok() || unshare(CLONE_NEWNS) != 0) {
      error_ = std::string("unshare(CLONE_NEWNS): ") + strerror(errno);
      return;
    }
    entered_ = true;
    if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        mount(sbin.c_str(), "/usr/sbin", nullptr, MS_BIND, nullptr) != 0) {
      error_ = std::string("bind mount over /usr/sbin: ") + strerror(errno);
    }
  }
  ~PrivateSbin() {
    if (entered_ && setns(orig_.get(), CLONE_NEWNS) != 0) ADD_FAILURE() << "setns back: " << strerror(errno);
    if (!cwd_.empty() && chdir(cwd_.c_str()) != 0) ADD_FAILURE() << "chdir back: " << strerror(errno);
  }
  PrivateSbin(const PrivateSbin&) = delete;
  PrivateSbin& operator=(const PrivateSbin&) = delete;

  const std::string& error() const { return error_; }

 private:
  UniqueFd orig_;
  std::string cwd_, error_;
  bool entered_ = false;
};

// The /proc/self/mounts line of `mnt`, "" if none.
std::string MountLine(const std::string& mnt) {
  std::ifstream in("/proc/self/mounts");
  for (std::string line; std::getline(in, line);) {
    std::istringstream is(line);
    std::string src, target;
    is >> src >> target;
    if (target == mnt) return line;
  }
  return "";
}

class MountHelperTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (getenv("DEFERFS_TEST_DIR") != nullptr) GTEST_SKIP() << "needs deferfs itself";
    ASSERT_EQ(mkdir(mnt_.c_str(), 0755), 0);
    RunResult mkfs = RunDeferfs({"mkfs", img_, "--size", "64M"});
    ASSERT_TRUE(mkfs.succeeded()) << mkfs.Describe();
    RunResult inst = RunCommand({"env", "DESTDIR=" + root_.path(), DEFERFS_CMAKE, "--install", DEFERFS_BUILD_DIR,
                                 "--prefix", "/usr"});
    ASSERT_TRUE(inst.succeeded()) << inst.Describe();
    // fuse3's mount.fuse (type fuse, source PROGRAM#SOURCE), which the bind
    // mount would otherwise hide.
    std::error_code ec;
    std::filesystem::copy_file("/usr/sbin/mount.fuse3", root_ / "usr/sbin/mount.fuse", ec);
    ASSERT_FALSE(ec) << "copy /usr/sbin/mount.fuse3: " << ec.message();
    ns_ = std::make_unique<PrivateSbin>(root_ / "usr/sbin");
    ASSERT_EQ(ns_->error(), "");
    struct stat st{};
    ASSERT_EQ(lstat("/sbin/mount.fuse.deferfs", &st), 0) << "the helper is not visible under /sbin";
  }

  void TearDown() override {
    // Unmount and stop the daemon inside the namespace, then leave it.
    if (ns_ && IsMounted(mnt_)) {
      ADD_FAILURE() << mnt_ << " was left mounted";
      RunCommand({"umount", "-l", mnt_});
    }
    if (ns_ && !WaitUntil([&] { return TryFlock(img_) != EWOULDBLOCK; })) {
      ADD_FAILURE() << "the daemon still holds " << img_ << " after the unmount";
    }
    ns_.reset();
  }

  // `deferfs stats --json` of the mount.
  std::string StatsJson() {
    RunResult r = RunDeferfs({"stats", mnt_, "--json"});
    EXPECT_TRUE(r.succeeded()) << r.Describe();
    return r.out;
  }

  // umount(8) must unmount and the daemon must exit (release the backing).
  void Umount() {
    RunResult u = RunCommand({"umount", mnt_});
    ASSERT_TRUE(u.succeeded()) << u.Describe();
    EXPECT_FALSE(IsMounted(mnt_));
    EXPECT_TRUE(WaitUntil([&] { return TryFlock(img_) == 0; })) << "the daemon did not exit after umount";
  }

  TempDir tmp_;
  TempDir root_{"/tmp", "deferfs-root"};
  const std::string img_ = tmp_ / "fs.img";
  const std::string mnt_ = tmp_ / "mnt";
  std::unique_ptr<PrivateSbin> ns_;
};

TEST_F(MountHelperTest, MountTypeFuseDeferfsRunsTheHelper) {
  RunResult r = RunCommand({"mount", "-t", "fuse.deferfs", img_, mnt_, "-o", "completion=defer,workers=4"}, 60s);
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  ASSERT_TRUE(IsLiveMount(mnt_)) << "mount(8) returned before the mount was ready";
  std::string line = MountLine(mnt_);
  EXPECT_NE(line.find(" fuse.deferfs rw,"), std::string::npos) << line;
  std::string json = StatsJson();
  EXPECT_NE(json.find("\"mode\":\"defer\""), std::string::npos) << json;
  EXPECT_NE(json.find("\"threads\":{\"workers\":4,"), std::string::npos) << json;
  {
    UniqueFd fd(open((mnt_ + "/f").c_str(), O_CREAT | O_RDWR, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(pwrite(fd.get(), "data", 4, 0), 4);
  }
  ASSERT_NO_FATAL_FAILURE(Umount());

  // The file survived: mount again and read it.
  RunResult again = RunCommand({"mount", "-t", "fuse.deferfs", img_, mnt_}, 60s);
  ASSERT_TRUE(again.succeeded()) << again.Describe();
  char buf[8] = {};
  UniqueFd fd(open((mnt_ + "/f").c_str(), O_RDONLY));
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  EXPECT_EQ(pread(fd.get(), buf, sizeof(buf), 0), 4);
  EXPECT_STREQ(buf, "data");
  fd.reset();
  ASSERT_NO_FATAL_FAILURE(Umount());
}

TEST_F(MountHelperTest, FstabLineWithBookkeepingWordsAndReadOnly) {
  const std::string fstab = tmp_ / "fstab";
  {
    std::ofstream out(fstab);
    out << "# a deferfs\n"
        << img_ << " " << mnt_ << " fuse.deferfs "
        << "defaults,noauto,nofail,_netdev,x-systemd.device-timeout=10s,ro,completion=workqueue,cthreads=2 0 0\n";
  }
  RunResult r = RunCommand({"mount", "--fstab", fstab, mnt_}, 60s);
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  ASSERT_TRUE(IsLiveMount(mnt_));
  std::string line = MountLine(mnt_);
  EXPECT_NE(line.find(" fuse.deferfs ro,"), std::string::npos) << line;
  std::string json = StatsJson();
  EXPECT_NE(json.find("\"mode\":\"workqueue\""), std::string::npos) << json;
  EXPECT_NE(json.find("\"cthreads\":2"), std::string::npos) << json;
  EXPECT_EQ(Err(open((mnt_ + "/new").c_str(), O_CREAT | O_WRONLY, 0644)), EROFS);
  ASSERT_NO_FATAL_FAILURE(Umount());
}

// mount.fuse3's older form: type fuse, source deferfs#BACKING. mount.fuse3
// runs `deferfs BACKING MOUNTPOINT -o OPTS`, found on mount(8)'s PATH.
TEST_F(MountHelperTest, MountTypeFuseWithTheProgramInTheSource) {
  RunResult r = RunCommand({"mount", "-t", "fuse", "deferfs#" + img_, mnt_, "-o", "completion=workqueue"}, 60s);
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  ASSERT_TRUE(IsLiveMount(mnt_)) << "mount(8) returned before the mount was ready";
  std::string json = StatsJson();
  EXPECT_NE(json.find("\"mode\":\"workqueue\""), std::string::npos) << json;
  ASSERT_NO_FATAL_FAILURE(Umount());

  RunResult bad = RunCommand({"mount", "-t", "fuse", "deferfs#" + img_, mnt_, "-o", "workers=0"}, 60s);
  EXPECT_FALSE(bad.succeeded()) << bad.Describe();
  EXPECT_NE(bad.err.find("workers"), std::string::npos) << bad.Describe();
  EXPECT_FALSE(IsMounted(mnt_));
}

TEST_F(MountHelperTest, BadOptionFailsNamingIt) {
  RunResult r = RunCommand({"mount", "-t", "fuse.deferfs", img_, mnt_, "-o", "workers=0"}, 60s);
  EXPECT_FALSE(r.succeeded()) << r.Describe();
  EXPECT_NE(r.err.find("workers"), std::string::npos) << r.Describe();
  EXPECT_FALSE(IsMounted(mnt_));
}

}  // namespace
}  // namespace deferfs_test
