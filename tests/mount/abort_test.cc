// The kernel aborts the FUSE connection (`echo 1 >
// /sys/fs/fuse/connections/N/abort`, the rescue of a hung mount) while
// writes are in flight, over either transport: every application call ends
// with an error, the daemon shuts down by itself (exit 0) and detaches the
// dead mount libfuse leaves behind, and after a remount what was written
// before is intact and fsck finds the store clean.
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/io_helpers.h"
#include "tests/mount/kernel_uring_switch.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

// The FUSE control filesystem, mounted for the test's lifetime in a
// directory of its own: the system's /sys/fs/fuse/connections, mounted or
// not, is left as it is.
class Fusectl {
 public:
  Fusectl() : dir_("/tmp", "deferfs-fusectl") {
    ok_ = mount("fusectl", dir_.path().c_str(), "fusectl", 0, nullptr) == 0;
    err_ = errno;
  }
  ~Fusectl() {
    if (ok_) umount2(dir_.path().c_str(), MNT_DETACH);
  }
  bool ok() const { return ok_; }
  int err() const { return err_; }
  // The abort switch of the connection of the mount with device `dev`.
  std::string AbortFile(dev_t dev) const { return dir_ / (std::to_string(minor(dev)) + "/abort"); }

 private:
  TempDir dir_;  // outlives the mount (members are destroyed in reverse order)
  bool ok_ = false;
  int err_ = 0;
};

class AbortTest : public ::testing::TestWithParam<std::string> {};  // the transport

TEST_P(AbortTest, AbortedConnectionEndsTheDaemonCleanly) {
  if (getenv("DEFERFS_TEST_DIR") != nullptr) GTEST_SKIP() << "needs deferfs itself";
  std::optional<KernelUringSwitch> sw;
  if (GetParam() == "uring") {
    sw.emplace(true);
    SKIP_WITHOUT_KERNEL_SUPPORT(*sw);
  }
  Fusectl fusectl;
  ASSERT_TRUE(fusectl.ok()) << "mount -t fusectl: " << strerror(fusectl.err());

  MountConfig config = MountVariant{"defer"}.Config();
  config.options.push_back("transport=" + GetParam());
  MountedFs fs(config);
  ASSERT_TRUE(fs.ok());
  std::mt19937_64 rng(11);
  const std::vector<uint8_t> kept = RandomBytes(rng, 1 << 20);
  ASSERT_TRUE(WriteAllDirect(fs.path("kept"), kept));

  struct stat st{};
  ASSERT_EQ(stat(fs.root().c_str(), &st), 0) << strerror(errno);
  const std::string abort_file = fusectl.AbortFile(st.st_dev);

  // Four writers of 4k O_DIRECT blocks until a write fails (or, should the
  // abort not happen, until told to stop).
  constexpr int kWriters = 4;
  std::atomic<uint64_t> written{0};
  std::atomic<bool> stop{false};
  std::vector<int> errs(kWriters, 0);
  std::vector<std::thread> writers;
  for (int i = 0; i < kWriters; i++) {
    writers.emplace_back([&, i] {
      UniqueFd fd(open(fs.path("busy" + std::to_string(i)).c_str(), O_CREAT | O_WRONLY | O_DIRECT | O_CLOEXEC, 0644));
      if (!fd.ok()) {
        errs[i] = errno;
        return;
      }
      AlignedBuf b(4096);
      for (uint64_t k = 0; !stop.load(); k++) {
        if (pwrite(fd.get(), b.data(), b.size(), static_cast<off_t>((k * 7919 % 1024) * 4096)) != 4096) {
          errs[i] = errno;
          return;
        }
        written.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  const bool busy = WaitUntil([&] { return written.load() >= 400; }, std::chrono::seconds(60));
  std::ofstream abort(abort_file);
  abort << "1\n";
  abort.flush();
  const bool aborted = abort.good();
  if (!aborted) stop = true;
  for (std::thread& t : writers) t.join();
  ASSERT_TRUE(aborted) << "cannot write " << abort_file;
  ASSERT_TRUE(busy) << "the writers wrote only " << written.load() << " blocks";
  for (int e : errs) EXPECT_TRUE(e == ECONNABORTED || e == ENOTCONN) << "a writer ended with " << strerror(e);

  ASSERT_TRUE(fs.WaitForExit("the connection's abort"));
  EXPECT_NE(fs.DaemonLog().find("was aborted: detached the dead mount"), std::string::npos) << fs.DaemonLog();

  ASSERT_TRUE(fs.Mount());
  bool ok = false;
  EXPECT_TRUE(SameBytes(kept, ReadAllDirect(fs.path("kept"), &ok)));
  EXPECT_TRUE(ok);
  ASSERT_TRUE(fs.Unmount());
  RunResult fsck = RunDeferfs({"fsck", fs.backing()});
  EXPECT_TRUE(fsck.succeeded()) << fsck.Describe();
}

INSTANTIATE_TEST_SUITE_P(Transports, AbortTest, ::testing::Values("dev", "uring"),
                         [](const ::testing::TestParamInfo<std::string>& p) { return p.param; });

}  // namespace
}  // namespace deferfs_test
