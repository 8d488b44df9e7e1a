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

// A sparse 128 MiB file for a loop device.
void MakeImage(const std::string& img) {
  UniqueFd fd(open(img.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_TRUE(fd.ok());
  ASSERT_EQ(ftruncate(fd.get(), 128 << 20), 0);
}

TEST(BlockDeviceTest, FormatsMountsAndKeepsDataOnALoopDevice) {
  TempDir tmp;
  const std::string img = tmp / "img";
  ASSERT_NO_FATAL_FAILURE(MakeImage(img));
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

// The metadata directory `deferfs mkfs` printed it made ("metadata in DIR").
std::string MetaDirOf(const RunResult& mkfs) {
  const std::string tag = "metadata in ";
  const size_t at = mkfs.out.find(tag);
  if (at == std::string::npos) return "";
  const std::string rest = mkfs.out.substr(at + tag.size());
  return rest.substr(0, rest.find('\n'));
}

// mkfs --force over a deferfs on a block device names the replaced
// filesystem's metadata directory (/var/lib/deferfs/UUID) and leaves it: a
// clone or snapshot of the device shares it. The new filesystem mounts.
TEST(BlockDeviceTest, ForcedMkfsNamesTheReplacedFilesystemsMetadata) {
  TempDir tmp;
  const std::string img = tmp / "img";
  ASSERT_NO_FATAL_FAILURE(MakeImage(img));
  LoopDevice loop(img);
  if (loop.path().empty()) GTEST_SKIP() << "no loop devices on this machine";
  std::vector<std::string> made;  // under /var/lib/deferfs: removed at the end whatever happens
  struct Cleanup {
    std::vector<std::string>* dirs;
    ~Cleanup() {
      for (const std::string& d : *dirs) RunCommand({"rm", "-rf", d});
    }
  } cleanup{&made};

  RunResult first = RunDeferfs({"mkfs", loop.path()});
  ASSERT_TRUE(first.succeeded()) << first.Describe();
  made.push_back(MetaDirOf(first));
  ASSERT_EQ(made[0].rfind("/var/lib/deferfs/", 0), 0u) << first.Describe();
  RunResult second = RunDeferfs({"mkfs", "--force", loop.path()});
  ASSERT_TRUE(second.succeeded()) << second.Describe();
  made.push_back(MetaDirOf(second));
  ASSERT_NE(made[1], made[0]) << second.Describe();
  EXPECT_EQ(access(made[0].c_str(), F_OK), 0) << "the replaced filesystem's metadata " << made[0] << " is gone";
  EXPECT_NE(second.out.find(made[0] + ", the metadata of the overwritten filesystem, is left in place"), std::string::npos)
      << second.Describe();

  MountedFs fs(MountConfig::Existing(loop.path()));
  ASSERT_TRUE(fs.ok());
  UniqueFd fd(open(fs.path("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  EXPECT_TRUE(fd.ok()) << strerror(errno);
}

}  // namespace
}  // namespace deferfs_test
