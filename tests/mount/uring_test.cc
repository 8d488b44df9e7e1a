// FUSE over io_uring (transport=uring) on a real mount: requests arrive and
// replies leave through the kernel's ring entries (the stats count both);
// data and namespace operations come out as over /dev/fuse in every
// completion mode; replies made on the poller or a completion thread reach
// the application through the owning worker's ring; fewer entries than
// requests in flight queue in the kernel; and with the kernel's switch off,
// the mount is refused up front with a one-line error.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/cli_error.h"
#include "tests/mount/io_helpers.h"
#include "tests/mount/kernel_uring_switch.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

constexpr uint64_t kMiB = 1024 * 1024;

// The kernel's queue count: one per possible CPU ("0-N" or a list).
uint64_t PossibleCpus() {
  std::ifstream f("/sys/devices/system/cpu/possible");
  std::string s;
  f >> s;
  size_t cut = s.find_last_of("-,");
  return std::stoull(cut == std::string::npos ? s : s.substr(cut + 1)) + 1;
}

MountConfig UringConfig(const MountVariant& v, std::vector<std::string> extra = {}) {
  MountConfig c = v.Config();
  c.options.push_back("transport=uring");
  c.options.insert(c.options.end(), extra.begin(), extra.end());
  return c;
}

class UringTest : public ::testing::TestWithParam<MountVariant> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_KERNEL_SUPPORT(switch_);
    fs_.emplace(UringConfig(GetParam()));
    ASSERT_TRUE(fs_->ok()) << "mount failed";
  }
  void TearDown() override { fs_.reset(); }

  KernelUringSwitch switch_{true};
  std::optional<MountedFs> fs_;
};

// Namespace operations, O_DIRECT IO of one block, of the largest request
// (1 MiB: a payload that fills an entry's buffer) and unaligned, buffered IO,
// and 4k random IO at queue depth 16 verified by fio; then the same bytes
// after a remount. Every request but INIT and FORGETs came through the ring,
// and replies made off the worker (the poller's reads, the completion
// thread's writes) were committed through it.
TEST_P(UringTest, EverythingTravelsThroughTheRing) {
  const MountVariant& v = GetParam();
  std::mt19937_64 rng(42);
  ASSERT_EQ(mkdir(fs_->path("d").c_str(), 0755), 0) << strerror(errno);
  for (int i = 0; i < 20; i++) {
    UniqueFd fd(open(fs_->path("d/f" + std::to_string(i)).c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
  }
  ASSERT_EQ(rename(fs_->path("d/f0").c_str(), fs_->path("d/g0").c_str()), 0) << strerror(errno);
  ASSERT_EQ(unlink(fs_->path("d/f1").c_str()), 0) << strerror(errno);
  size_t entries = 0;
  if (DIR* d = opendir(fs_->path("d").c_str())) {
    while (dirent* e = readdir(d)) entries += e->d_name[0] != '.';
    closedir(d);
  }
  EXPECT_EQ(entries, 19u);

  // 1 MiB + 4 KiB + an unaligned tail, written O_DIRECT where aligned.
  const std::vector<uint8_t> big = RandomBytes(rng, kMiB + 4096);
  ASSERT_TRUE(WriteAllDirect(fs_->path("big"), big));
  const std::vector<uint8_t> odd = RandomBytes(rng, 10000);
  {
    UniqueFd fd(open(fs_->path("odd").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(PwriteFull(fd.get(), odd.data(), odd.size(), 777), 0) << strerror(errno);
    std::vector<uint8_t> back(odd.size());
    ASSERT_EQ(PreadUpTo(fd.get(), back.data(), back.size(), 777), static_cast<ssize_t>(back.size()));
    EXPECT_TRUE(SameBytes(odd, back));
  }
  RunResult r = RunFio("ringio", fs_->path("fio"),
                       {"--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=io_uring", "--iodepth=16",
                        "--size=8M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=1"});
  ASSERT_TRUE(FioSucceeded(r, *fs_));

  Stats s = Stats::Read(*fs_);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s.text("transport"), "uring") << s.raw();
  EXPECT_GT(s["fuse.ring_requests"], 2 * 2048u) << s.raw();  // fio alone: 2048 writes and 2048 verify reads
  EXPECT_LT(s["fuse.dev_requests"], 100u) << s.raw();
  // READs are read into their slot's buffer: of the 8 MiB fio verified and
  // the rest read back above, no payload was copied; small replies (entries,
  // attributes, directory listings) are.
  EXPECT_GT(s["fuse.ring_copied_bytes"], 0u) << s.raw();
  EXPECT_LT(s["fuse.ring_copied_bytes"], 256u * 1024) << "READ replies were copied into the ring: " << s.raw();
  if (v.mode == "sync") {
    EXPECT_EQ(s["fuse.remote_commits"], 0u) << "sync mode replies from the worker itself: " << s.raw();
  } else {
    EXPECT_GT(s["fuse.remote_commits"], 0u) << "no reply came from the poller or a completion thread: " << s.raw();
  }

  ASSERT_TRUE(fs_->Remount());
  bool ok = false;
  EXPECT_TRUE(SameBytes(big, ReadAllDirect(fs_->path("big"), &ok)));
  EXPECT_TRUE(ok);
  {
    UniqueFd fd(open(fs_->path("odd").c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    std::vector<uint8_t> back(odd.size());
    ASSERT_EQ(PreadUpTo(fd.get(), back.data(), back.size(), 777), static_cast<ssize_t>(back.size()));
    EXPECT_TRUE(SameBytes(odd, back));
  }
  r = RunFio("ringio", fs_->path("fio"),
             {"--rw=randread", "--bs=4k", "--direct=1", "--ioengine=io_uring", "--iodepth=16", "--size=8M",
              "--verify=crc32c", "--verify_fatal=1", "--verify_only=1", "--randrepeat=1"});
  EXPECT_TRUE(FioSucceeded(r, *fs_));
}

INSTANTIATE_TEST_SUITE_P(Modes, UringTest, ::testing::ValuesIn(EveryMode(1, 1, 1)), VariantName());

// One entry per kernel queue and 32 requests in flight: the rest wait in the
// kernel and each commit fetches the next at once. Two workers share the queues.
TEST(UringMount, FewerEntriesThanRequestsInFlight) {
  KernelUringSwitch sw(true);
  SKIP_WITHOUT_KERNEL_SUPPORT(sw);
  MountedFs fs(UringConfig(MountVariant{"defer", 2, 1, 1}, {"uring_depth=1"}));
  ASSERT_TRUE(fs.ok());
  RunResult r = RunFio("narrow", fs.path("f"),
                       {"--rw=randrw", "--bs=4k", "--direct=1", "--ioengine=io_uring", "--iodepth=32", "--size=8M",
                        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=1"});
  ASSERT_TRUE(FioSucceeded(r, fs));
  Stats s = Stats::Read(fs);
  EXPECT_EQ(s.text("transport"), "uring") << s.raw();
  EXPECT_GT(s["fuse.ring_requests"], 2048u) << s.raw();
  EXPECT_EQ(s["buffers.ring"], PossibleCpus()) << "one slot per kernel queue: " << s.raw();
}

// Without the switch the kernel would route nothing through a ring: the
// mount is refused before anything is mounted, with the fix in the message.
TEST(UringMount, RefusedWhileTheKernelHasItOff) {
  KernelUringSwitch sw(false);
  SKIP_WITHOUT_KERNEL_SUPPORT(sw);
  TempDir tmp;
  const std::string img = tmp / "fs.img", mnt = tmp / "mnt";
  ASSERT_EQ(mkdir(mnt.c_str(), 0755), 0);
  ASSERT_TRUE(RunDeferfs({"mkfs", img, "--size", "64M"}).succeeded());
  EXPECT_TRUE(IsCliError(RunDeferfs({"mount", img, mnt, "-o", "transport=uring"}), "enable_uring"));
  EXPECT_FALSE(IsMounted(mnt));
  if (IsMounted(mnt)) RunCommand({"fusermount3", "-u", mnt});
}

// The default stays read(2)/writev(2) on /dev/fuse, whatever the switch says.
TEST(UringMount, DevIsTheDefault) {
  KernelUringSwitch sw(true);
  SKIP_WITHOUT_KERNEL_SUPPORT(sw);
  if (const char* o = getenv("DEFERFS_MOUNT_OPTS"); o && std::strstr(o, "transport=")) {
    GTEST_SKIP() << "DEFERFS_MOUNT_OPTS chooses the transport";
  }
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  ASSERT_TRUE(WriteAllDirect(fs.path("f"), std::vector<uint8_t>(64 * 1024, 7)));
  Stats s = Stats::Read(fs);
  EXPECT_EQ(s.text("transport"), "dev") << s.raw();
  EXPECT_EQ(s["fuse.ring_requests"], 0u) << s.raw();
  EXPECT_GT(s["fuse.dev_requests"], 3u) << s.raw();  // INIT, LOOKUP, CREATE, WRITE, ...
}

}  // namespace
}  // namespace deferfs_test
