// A block device as the backing: a loop device over a file, formatted and
// mounted like a real NVMe namespace (BLKGETSIZE64, the logical block size).
#include <fcntl.h>
#include <unistd.h>

#include <random>

#include "tests/mount/io_helpers.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

// A loop device attached to `file` for the test's lifetime.
class LoopDevice {
 public:
  explicit LoopDevice(const std::string& file) {
    RunResult r = RunCommand({"losetup", "--find", "--show", file});
    if (r.succeeded()) dev_ = r.out.substr(0, r.out.find('\n'));
  }
  ~LoopDevice() {
    if (!dev_.empty()) RunCommand({"losetup", "-d", dev_});
  }
  const std::string& path() const { return dev_; }

 private:
  std::string dev_;
};

TEST(BlockDeviceTest, FormatsMountsAndKeepsDataOnALoopDevice) {
  TempDir tmp;
  const std::string img = tmp / "img";
  {
    UniqueFd fd(open(img.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    ASSERT_TRUE(fd.ok());
    ASSERT_EQ(ftruncate(fd.get(), 128 << 20), 0);
  }
  LoopDevice loop(img);
  if (loop.path().empty()) GTEST_SKIP() << "no loop devices on this machine";
  const std::string meta = tmp / "meta";
  RunResult mkfs = RunDeferfs({"mkfs", loop.path(), "--meta", meta});
  ASSERT_TRUE(mkfs.succeeded()) << mkfs.Describe();

  MountConfig cfg = MountConfig::Existing(loop.path());
  cfg.meta = meta;
  std::mt19937_64 rng(7);
  std::vector<uint8_t> data = RandomBytes(rng, 3 << 20);
  {
    MountedFs fs(cfg);
    ASSERT_TRUE(fs.ok());
    {
      UniqueFd fd(open(fs.path("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
      ASSERT_TRUE(fd.ok());
      ASSERT_EQ(PwriteFull(fd.get(), data.data(), data.size(), 0), 0);
      ASSERT_EQ(fsync(fd.get()), 0);
    }
    ASSERT_TRUE(fs.Remount());
    bool ok = false;
    std::vector<uint8_t> back = ReadAllDirect(fs.path("f"), &ok);
    ASSERT_TRUE(ok);
    EXPECT_TRUE(SameBytes(data, back));
  }
}

}  // namespace
}  // namespace deferfs_test
