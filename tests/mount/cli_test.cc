// The deferfs command line on bad input: every error exits non-zero, prints
// exactly one stderr line "deferfs: ..." and changes nothing on disk. Plus
// the mount life cycle a script relies on (background mount ready on return,
// daemon gone after unmount, foreground daemon exits 0 on SIGTERM).
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/xattr.h>
#include <linux/magic.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/cli_error.h"
#include "tests/mount/io_helpers.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using namespace std::chrono_literals;

// ------------------------------------------------------------------ helpers

bool Exists(const std::string& p) {
  struct stat st{};
  return lstat(p.c_str(), &st) == 0;
}

std::string ReadHead(const std::string& p, size_t n = 4096) {
  std::ifstream in(p, std::ios::binary);
  std::string s(n, '\0');
  in.read(s.data(), static_cast<std::streamsize>(n));
  s.resize(static_cast<size_t>(in.gcount()));
  return s;
}

off_t SizeOf(const std::string& p) {
  struct stat st{};
  return lstat(p.c_str(), &st) == 0 ? st.st_size : -1;
}

// relative path -> size and mtime of everything under `dir`. RocksDB's info
// log (LOG, LOG.old.*) is diagnostic output, not state: left out on request.
std::map<std::string, std::string> TreeState(const std::string& dir, bool skip_info_log = false) {
  std::map<std::string, std::string> out;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (skip_info_log && name.rfind("LOG", 0) == 0) continue;
    struct stat st{};
    lstat(it->path().c_str(), &st);
    std::ostringstream os;
    os << "mode=" << std::oct << st.st_mode << std::dec << " size=" << st.st_size
       << " mtime=" << st.st_mtim.tv_sec << "." << st.st_mtim.tv_nsec;
    out[it->path().lexically_relative(dir).string()] = os.str();
  }
  return out;
}

void MakeSparse(const std::string& p, off_t size, std::string_view head = {}) {
  UniqueFd fd(open(p.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd.ok()) << p << ": " << strerror(errno);
  ASSERT_EQ(write(fd.get(), head.data(), head.size()), static_cast<ssize_t>(head.size()));
  ASSERT_EQ(ftruncate(fd.get(), size), 0);
}

void Mkfs(const std::string& backing, const std::string& size = "64M") {
  RunResult r = RunDeferfs({"mkfs", backing, "--size", size});
  ASSERT_TRUE(r.succeeded()) << "mkfs " << backing << ": " << r.Describe();
  ASSERT_TRUE(Exists(backing + ".meta")) << "mkfs did not create the default meta dir";
}

// Pid of the process holding an flock on `p` (from /proc/locks), or -1.
pid_t FlockHolder(const std::string& p) {
  struct stat st{};
  if (stat(p.c_str(), &st) != 0) return -1;
  std::ifstream locks("/proc/locks");
  std::string line;
  const std::string ino_suffix = ":" + std::to_string(st.st_ino);
  while (std::getline(locks, line)) {
    std::istringstream is(line);
    std::string idx, kind, mode, rw, pid, dev;
    is >> idx >> kind >> mode >> rw >> pid >> dev;
    if (kind == "FLOCK" && dev.size() > ino_suffix.size() &&
        dev.compare(dev.size() - ino_suffix.size(), ino_suffix.size(), ino_suffix) == 0) {
      return static_cast<pid_t>(std::stol(pid));
    }
  }
  return -1;
}

// True once `pid` has exited: gone, or a zombie (its files closed either way).
bool Exited(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return true;
  const size_t paren = line.rfind(')');  // "pid (comm) STATE ..."
  if (paren == std::string::npos || paren + 2 >= line.size()) return true;
  return line[paren + 2] == 'Z' || line[paren + 2] == 'X';
}

// Cleans up after `deferfs mount` runs that daemonized (on purpose or by
// mistake): unmounts `mnt` and makes sure the daemon that served `backing`
// (if given) is gone — if it outlives its mount it is killed by its pid.
class MountGuard {
 public:
  MountGuard(std::string mnt, std::string backing) : mnt_(std::move(mnt)), backing_(std::move(backing)) {}
  MountGuard(const MountGuard&) = delete;
  MountGuard& operator=(const MountGuard&) = delete;
  ~MountGuard() {
    if (IsMounted(mnt_) && !expect_mounted_) ADD_FAILURE() << mnt_ << " was left mounted";
    for (int stacked = 0; stacked < 4 && IsMounted(mnt_); stacked++) {  // the stacking tests leave several
      if (!RunCommand({"fusermount3", "-u", mnt_}).succeeded()) RunCommand({"umount", "-l", mnt_});
    }
    if (!backing_.empty() && !WaitUntil([&] { return TryFlock(backing_) != EWOULDBLOCK; })) {
      pid_t holder = FlockHolder(backing_);
      ADD_FAILURE() << "a deferfs daemon (pid " << holder << ") still holds " << backing_
                    << " after its unmount; killing it";
      if (holder > 0 && holder != getpid()) kill(holder, SIGKILL);
    }
  }
  // Set while the test itself owns a mount it will unmount.
  void expect_mounted(bool v) { expect_mounted_ = v; }

 private:
  std::string mnt_, backing_;
  bool expect_mounted_ = false;
};

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (getenv("DEFERFS_TEST_DIR") != nullptr) GTEST_SKIP() << "CLI tests need deferfs itself";
    ASSERT_TRUE(Exists(DEFERFS_BIN)) << DEFERFS_BIN << " is not built";
    ASSERT_FALSE(tmp_.path().empty());
    ASSERT_EQ(mkdir(mnt_.c_str(), 0755), 0);
  }

  // `deferfs mount` in the background (no -f) of `backing` at mnt_.
  RunResult MountBg(const std::string& backing, std::vector<std::string> extra = {}) {
    std::vector<std::string> args{"mount", backing, mnt_};
    args.insert(args.end(), extra.begin(), extra.end());
    return RunDeferfs(args, 30s);
  }

  TempDir tmp_;
  const std::string mnt_ = tmp_ / "mnt";
};

// ------------------------------------------------------------------- tests

TEST_F(CliTest, UnknownSubcommand) {
  EXPECT_TRUE(IsCliError(RunDeferfs({"frobnicate"}), "frobnicate"));
  EXPECT_TRUE(IsCliError(RunDeferfs({"frobnicate", tmp_ / "x"}), "frobnicate"));
  EXPECT_FALSE(Exists(tmp_ / "x"));
}

TEST_F(CliTest, MkfsWithoutArguments) { EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs"}))); }

TEST_F(CliTest, MkfsOfMissingPathNeedsSize) {
  const std::string img = tmp_ / "new.img";
  EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img}), "size"));
  EXPECT_FALSE(Exists(img));
  EXPECT_FALSE(Exists(img + ".meta"));
}

TEST_F(CliTest, MkfsRejectsBadOrTooSmallSize) {
  const std::string img = tmp_ / "new.img";
  for (const char* size : {"bad", "1M", "15M", "12Q", "-64M", "0", "M"}) {
    SCOPED_TRACE(std::string("--size ") + size);
    EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img, "--size", size})));
    EXPECT_FALSE(Exists(img));
    EXPECT_FALSE(Exists(img + ".meta"));
  }
  EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img, "--size"})));  // missing value
  EXPECT_FALSE(Exists(img));
  EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img, "--size", "9000000T"}), "larger than a file"));
  EXPECT_FALSE(Exists(img));
  // 16M is the documented minimum and must be accepted.
  RunResult ok = RunDeferfs({"mkfs", img, "--size", "16M"});
  EXPECT_TRUE(ok.succeeded()) << ok.Describe();
  EXPECT_EQ(SizeOf(img), 16 << 20);
}

TEST_F(CliTest, MkfsRefusesExistingDeferfsWithoutForce) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  const std::string head = ReadHead(img);
  const auto meta = TreeState(img + ".meta");
  ASSERT_FALSE(meta.empty());

  EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img}), "force"));
  EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img, "--size", "64M"}), "force"));
  EXPECT_EQ(ReadHead(img), head) << "superblock changed";
  EXPECT_EQ(TreeState(img + ".meta"), meta) << "meta dir changed";
  EXPECT_EQ(SizeOf(img), 64 << 20);

  MountedFs fs(MountConfig::Existing(img));
  ASSERT_TRUE(fs.ok()) << "the untouched file system no longer mounts";
  UniqueFd fd(open(fs.path("probe").c_str(), O_CREAT | O_WRONLY, 0644));
  EXPECT_TRUE(fd.ok()) << strerror(errno);
}

TEST_F(CliTest, MkfsForceReformats) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  {
    MountedFs fs(MountConfig::Existing(img));
    ASSERT_TRUE(fs.ok());
    UniqueFd fd(open(fs.path("old-file").c_str(), O_CREAT | O_WRONLY, 0644));
    ASSERT_TRUE(fd.ok());
  }
  const std::string head = ReadHead(img);
  RunResult r = RunDeferfs({"mkfs", img, "--force"});
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  EXPECT_NE(ReadHead(img), head) << "a fresh file system needs a fresh superblock (new UUID)";
  EXPECT_FALSE(Exists(img + ".meta.mkfs-tmp")) << "the replaced store, swapped out to the new one's name, was left there";
  MountedFs fs(MountConfig::Existing(img));
  ASSERT_TRUE(fs.ok());
  struct stat st{};
  EXPECT_EQ(Err(lstat(fs.path("old-file").c_str(), &st)), ENOENT) << "the old tree survived --force";
}

// mkfs --force with --meta elsewhere: the replaced filesystem's metadata in
// its default place (BACKING.meta) goes too, since it belongs to nothing
// now; a store of another filesystem found there stays.
TEST_F(CliTest, MkfsForceRemovesOnlyTheReplacedFilesystemsMetadata) {
  const std::string img = tmp_ / "fs.img", meta = tmp_ / "meta";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  RunResult r = RunDeferfs({"mkfs", img, "--force", "--meta", meta});
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  EXPECT_FALSE(Exists(img + ".meta")) << "the replaced filesystem's metadata was left behind";
  EXPECT_FALSE(Exists(img + ".meta.mkfs-old")) << "it was renamed aside, and left there";

  ASSERT_NO_FATAL_FAILURE(Mkfs(tmp_ / "other.img"));
  ASSERT_EQ(rename((tmp_ / "other.img.meta").c_str(), (img + ".meta").c_str()), 0) << strerror(errno);
  const auto other = TreeState(img + ".meta");
  r = RunDeferfs({"mkfs", img, "--force", "--meta", meta});
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  EXPECT_EQ(TreeState(img + ".meta"), other) << "another filesystem's metadata was touched";
  MountConfig cfg = MountConfig::Existing(img);
  cfg.meta = meta;
  MountedFs fs(cfg);
  EXPECT_TRUE(fs.ok());
}

// The overwritten filesystem's metadata is not removed while something has
// it open: here a mount of a copy of the old backing file, which the old
// store's pairing fits. That store also refuses a read-only mount while the
// read-write one holds it.
TEST_F(CliTest, MkfsForceKeepsTheReplacedMetadataWhileItIsInUse) {
  const std::string img = tmp_ / "fs.img", copy = tmp_ / "copy.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  std::error_code ec;
  ASSERT_TRUE(std::filesystem::copy_file(img, copy, ec)) << ec.message();
  MountGuard guard(mnt_, copy);
  guard.expect_mounted(true);
  RunResult m = MountBg(copy, {"-o", "meta=" + img + ".meta"});
  ASSERT_TRUE(m.succeeded()) << m.Describe();
  {
    const std::string ro_mnt = tmp_ / "ro-mnt";
    ASSERT_EQ(mkdir(ro_mnt.c_str(), 0755), 0) << strerror(errno);
    MountGuard ro_guard(ro_mnt, img);
    EXPECT_TRUE(IsCliError(RunDeferfs({"mount", img, ro_mnt, "-o", "ro"}, 30s), "in use by another deferfs"));
  }

  RunResult r = RunDeferfs({"mkfs", img, "--force", "--meta", tmp_ / "meta"});
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  EXPECT_NE(r.out.find("left in place"), std::string::npos) << r.Describe();
  EXPECT_TRUE(Exists(img + ".meta/CURRENT")) << "a mounted filesystem's metadata was removed";
  {
    UniqueFd fd(open((mnt_ + "/f").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    EXPECT_EQ(fsync(fd.get()), 0) << strerror(errno);
  }
  EXPECT_EQ(umount(mnt_.c_str()), 0) << strerror(errno);
  guard.expect_mounted(false);
}

// --force replaces metadata only: a mistyped --meta naming someone's
// directory, or a mounted filesystem's store, gets an error, and neither it
// nor the backing changes. An empty directory, or an unmounted filesystem's
// store, is replaced.
TEST_F(CliTest, MkfsForceReplacesOnlyMetadataAtTheMetaPath) {
  const std::string img = tmp_ / "fs.img", docs = tmp_ / "docs";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  const std::string head = ReadHead(img);
  ASSERT_EQ(mkdir(docs.c_str(), 0755), 0) << strerror(errno);
  ASSERT_NO_FATAL_FAILURE(MakeSparse(docs + "/thesis.txt", 64, "chapter"));
  const auto before = TreeState(docs);
  EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img, "--force", "--meta", docs}), "is not deferfs metadata"));
  EXPECT_EQ(TreeState(docs), before);
  EXPECT_EQ(ReadHead(img), head) << "the backing was reformatted all the same";

  const std::string empty = tmp_ / "empty";
  ASSERT_EQ(mkdir(empty.c_str(), 0755), 0) << strerror(errno);
  RunResult r = RunDeferfs({"mkfs", img, "--force", "--meta", empty});
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  ASSERT_NO_FATAL_FAILURE(Mkfs(tmp_ / "other.img"));
  {
    MountedFs other(MountConfig::Existing(tmp_ / "other.img"));
    ASSERT_TRUE(other.ok());
    EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img, "--force", "--meta", tmp_ / "other.img.meta"}),
                           "in use by another deferfs"));
    // Still there and in use: a change and its fsync go through.
    EXPECT_TRUE(Exists(tmp_ / "other.img.meta/CURRENT"));
    UniqueFd fd(open(other.path("f").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    EXPECT_EQ(fsync(fd.get()), 0) << strerror(errno);
  }
  {
    // A read-only mount holds the store too.
    MountGuard guard(mnt_, tmp_ / "other.img");
    guard.expect_mounted(true);
    RunResult m = MountBg(tmp_ / "other.img", {"-o", "ro"});
    ASSERT_TRUE(m.succeeded()) << m.Describe();
    EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img, "--force", "--meta", tmp_ / "other.img.meta"}),
                           "in use by another deferfs"));
    EXPECT_TRUE(Exists(mnt_ + "/f")) << "the read-only mount lost its metadata";
    EXPECT_EQ(umount(mnt_.c_str()), 0) << strerror(errno);
    guard.expect_mounted(false);
  }
  // Named with a trailing slash: the same directory.
  r = RunDeferfs({"mkfs", img, "--force", "--meta", tmp_ / "other.img.meta/"});
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  EXPECT_FALSE(Exists(tmp_ / "other.img.meta/.mkfs-tmp"));
  MountConfig cfg = MountConfig::Existing(img);
  cfg.meta = tmp_ / "other.img.meta";
  MountedFs fs(cfg);
  EXPECT_TRUE(fs.ok());
}

TEST_F(CliTest, MountOfMissingBacking) {
  const std::string img = tmp_ / "absent.img";
  EXPECT_TRUE(IsCliError(MountBg(img)));
  EXPECT_FALSE(Exists(img));
  EXPECT_FALSE(Exists(img + ".meta"));
  EXPECT_FALSE(IsMounted(mnt_));
}

TEST_F(CliTest, MountOfUnformattedFile) {
  const std::string img = tmp_ / "zeros.img";
  ASSERT_NO_FATAL_FAILURE(MakeSparse(img, 64 << 20));
  MountGuard guard(mnt_, img);
  EXPECT_TRUE(IsCliError(MountBg(img), "not a deferfs"));
  EXPECT_EQ(ReadHead(img, 1 << 20), std::string(1 << 20, '\0'));
  EXPECT_EQ(SizeOf(img), 64 << 20);
  EXPECT_FALSE(Exists(img + ".meta"));
  EXPECT_FALSE(IsMounted(mnt_));
}

TEST_F(CliTest, MountOfFileWithOtherContent) {
  const std::string img = tmp_ / "random.img";
  std::mt19937_64 rng(42);
  std::string junk(1 << 20, '\0');
  for (auto& c : junk) c = static_cast<char>(rng());
  ASSERT_NO_FATAL_FAILURE(MakeSparse(img, 64 << 20, junk));
  MountGuard guard(mnt_, img);
  EXPECT_TRUE(IsCliError(MountBg(img), "not a deferfs"));
  EXPECT_EQ(ReadHead(img, junk.size()), junk);
  EXPECT_EQ(SizeOf(img), 64 << 20);
  EXPECT_FALSE(Exists(img + ".meta"));
  EXPECT_FALSE(IsMounted(mnt_));
}

TEST_F(CliTest, MountWithMissingMetaDir) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  MountGuard guard(mnt_, img);
  const std::string head = ReadHead(img);
  const auto meta = TreeState(img + ".meta");

  const std::string elsewhere = tmp_ / "no-such-meta";
  EXPECT_TRUE(IsCliError(MountBg(img, {"-o", "meta=" + elsewhere})));
  EXPECT_FALSE(Exists(elsewhere));
  EXPECT_FALSE(IsMounted(mnt_));
  const std::string a_file = tmp_ / "a-file";
  ASSERT_NO_FATAL_FAILURE(MakeSparse(a_file, 10));
  EXPECT_TRUE(IsCliError(MountBg(img, {"-o", "meta=" + a_file}), "is not a directory"));
  EXPECT_FALSE(IsMounted(mnt_));

  // The default meta dir moved away: no silent fresh one in its place.
  ASSERT_EQ(rename((img + ".meta").c_str(), (tmp_ / "moved.meta").c_str()), 0);
  EXPECT_TRUE(IsCliError(MountBg(img)));
  EXPECT_FALSE(Exists(img + ".meta"));
  EXPECT_FALSE(IsMounted(mnt_));
  EXPECT_EQ(ReadHead(img), head);
  EXPECT_EQ(TreeState(tmp_ / "moved.meta"), meta);
}

TEST_F(CliTest, MountWithAnotherFilesystemsMeta) {
  const std::string a = tmp_ / "a.img", b = tmp_ / "b.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(a));
  ASSERT_NO_FATAL_FAILURE(Mkfs(b));
  MountGuard guard(mnt_, a);
  const std::string head_a = ReadHead(a), head_b = ReadHead(b);
  const auto meta_a = TreeState(a + ".meta");
  const auto meta_b = TreeState(b + ".meta", /*skip_info_log=*/true);
  EXPECT_TRUE(IsCliError(MountBg(a, {"-o", "meta=" + b + ".meta"}), "uuid"));
  EXPECT_FALSE(IsMounted(mnt_));
  EXPECT_EQ(ReadHead(a), head_a);
  EXPECT_EQ(ReadHead(b), head_b);
  EXPECT_EQ(TreeState(a + ".meta"), meta_a);
  EXPECT_EQ(TreeState(b + ".meta", true), meta_b);
  // Both still mount with their own meta.
  MountedFs fa(MountConfig::Existing(a));
  EXPECT_TRUE(fa.ok());
  MountedFs fb(MountConfig::Existing(b));
  EXPECT_TRUE(fb.ok());
}

TEST_F(CliTest, MountRejectsBadOptions) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  MountGuard guard(mnt_, img);
  const std::string head = ReadHead(img);
  const auto meta = TreeState(img + ".meta");
  const std::vector<std::pair<std::string, std::string>> cases{
      {"bogus=1", "bogus"},          {"workers=0", "workers"},   {"workers=abc", "workers"},
      {"completion=fast", "completion"}, {"workers=", "workers"}, {"allow_other,bogus", "bogus"},
      {"remount", "unmount and mount again"}, {"cpus=", "cpus"}, {"cpus=2-1", "cpus"}, {"cpus=0:", "cpus"},
      {"cpus=1024", "cpus"}, {"cpus=1023", "choose among"}, {"undo_log=", "undo_log"},
      {"undo_log=" + (tmp_ / "missing/undo.log"), "cannot create the undo log"},
      // Passed to libfuse and the kernel, checked by us first: their own
      // refusals come late and take two lines.
      {"max_read=abc", "max_read"}, {"max_read=0", "max_read"}, {"blksize=4096", "add blkdev"},
      {"blksize=1000,blkdev", "power of two"}, {"blkdev", "needs a block device"}};
  for (const auto& [opt, mention] : cases) {
    SCOPED_TRACE("-o " + opt);
    EXPECT_TRUE(IsCliError(MountBg(img, {"-o", opt}), mention));
    EXPECT_FALSE(IsMounted(mnt_));
    if (IsMounted(mnt_)) RunCommand({"fusermount3", "-u", mnt_});
    WaitUntil([&] { return TryFlock(img) == 0; });
  }
  EXPECT_EQ(ReadHead(img), head);
  EXPECT_EQ(TreeState(img + ".meta"), meta);
}

// libfuse splits its -o at ',' and takes '\\' as an escape: the backing's
// name, which becomes the mount's fsname, is escaped so that it stays one
// option, and the mount table shows it as it is.
TEST_F(CliTest, BackingNamedWithACommaAndABackslashMounts) {
  const std::string img = tmp_ / "a,b\\c.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  MountGuard guard(mnt_, img);
  guard.expect_mounted(true);
  RunResult m = MountBg(img, {"-o", "max_read=131072"});  // and max_read=, which libfuse's INIT must agree to
  ASSERT_TRUE(m.succeeded()) << m.Describe();
  EXPECT_TRUE(IsMounted(mnt_));
  // Found by its source: a second mount names where the first one is.
  const std::string other = tmp_ / "other";
  ASSERT_EQ(mkdir(other.c_str(), 0755), 0) << strerror(errno);
  EXPECT_TRUE(IsCliError(RunDeferfs({"mount", img, other}, 30s), "is mounted at " + mnt_));
  EXPECT_EQ(umount(mnt_.c_str()), 0) << strerror(errno);
  guard.expect_mounted(false);
}

TEST_F(CliTest, MountpointMissing) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  const std::string head = ReadHead(img);
  const std::string nowhere = tmp_ / "no-such-dir";
  MountGuard guard(nowhere, img);
  EXPECT_TRUE(IsCliError(RunDeferfs({"mount", img, nowhere})));
  EXPECT_FALSE(Exists(nowhere));
  EXPECT_EQ(ReadHead(img), head);
}

TEST_F(CliTest, MountpointIsAFile) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  const std::string file = tmp_ / "plain-file";
  ASSERT_NO_FATAL_FAILURE(MakeSparse(file, 1, "x"));
  MountGuard guard(file, img);
  EXPECT_TRUE(IsCliError(RunDeferfs({"mount", img, file})));
  EXPECT_EQ(ReadHead(file), "x");
  EXPECT_FALSE(IsMounted(file));
}

// umount returns before the daemon has closed its metadata and let go of
// the backing. The commands that come next must wait for it, not refuse:
// a mount straight after an unmount, round after round, then fsck and mkfs.
TEST_F(CliTest, CommandsRightAfterAnUnmountWaitForTheDaemon) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  MountGuard guard(mnt_, img);
  guard.expect_mounted(true);
  void* buf = nullptr;
  ASSERT_EQ(posix_memalign(&buf, 4096, 1 << 20), 0);
  std::unique_ptr<void, decltype(&free)> own(buf, &free);
  memset(buf, 'u', 1 << 20);
  constexpr int kRounds = 8;
  for (int i = 0; i < kRounds; i++) {
    SCOPED_TRACE("round " + std::to_string(i));
    RunResult m = MountBg(img, {"-o", "completion=workqueue,cthreads=2"});
    ASSERT_TRUE(m.succeeded()) << m.Describe();
    // Writes in flight until just before the unmount: the daemon has work left.
    UniqueFd fd(open((mnt_ + "/f" + std::to_string(i)).c_str(), O_CREAT | O_WRONLY | O_DIRECT, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(pwrite(fd.get(), buf, 1 << 20, 0), 1 << 20) << strerror(errno);
    fd = UniqueFd();
    ASSERT_EQ(umount(mnt_.c_str()), 0) << strerror(errno);  // as umount(8) does
  }
  RunResult f = RunDeferfs({"fsck", img});
  EXPECT_TRUE(f.succeeded()) << f.Describe();
  RunResult m = MountBg(img);
  ASSERT_TRUE(m.succeeded()) << m.Describe();
  for (int i = 0; i < kRounds; i++) EXPECT_EQ(SizeOf(mnt_ + "/f" + std::to_string(i)), 1 << 20) << i;
  ASSERT_EQ(umount(mnt_.c_str()), 0) << strerror(errno);
  guard.expect_mounted(false);
  RunResult k = RunDeferfs({"mkfs", img, "--force"});
  EXPECT_TRUE(k.succeeded()) << k.Describe();
}

// Once the kernel has unmounted a deferfs, the next FUSE mount may get its
// device number. The exiting daemon, which looks for a dead mount of its
// own to detach, must not take that one for its own. The daemon is held
// (SIGSTOP) across the unmount and the second mount, so the second mount
// is there when it looks.
TEST_F(CliTest, AnExitingDaemonLeavesTheNextMountOfItsDeviceNumberAlone) {
  const std::string a = tmp_ / "a.img", b = tmp_ / "b.img", mnt_b = tmp_ / "mnt-b";
  ASSERT_NO_FATAL_FAILURE(Mkfs(a));
  ASSERT_NO_FATAL_FAILURE(Mkfs(b));
  ASSERT_EQ(mkdir(mnt_b.c_str(), 0755), 0);
  MountGuard guard_b(mnt_b, b);
  guard_b.expect_mounted(true);
  MountGuard guard_a(mnt_, a);
  guard_a.expect_mounted(true);
  RunResult m = MountBg(a);
  ASSERT_TRUE(m.succeeded()) << m.Describe();
  struct stat st_a{};
  ASSERT_EQ(stat(mnt_.c_str(), &st_a), 0) << strerror(errno);
  const pid_t daemon_a = FlockHolder(a);
  ASSERT_GT(daemon_a, 0);
  ASSERT_EQ(kill(daemon_a, SIGSTOP), 0) << strerror(errno);
  struct Resume {
    pid_t pid;
    ~Resume() { kill(pid, SIGCONT); }
  } resume{daemon_a};
  ASSERT_EQ(umount(mnt_.c_str()), 0) << strerror(errno);
  guard_a.expect_mounted(false);
  m = RunDeferfs({"mount", b, mnt_b}, 30s);
  ASSERT_TRUE(m.succeeded()) << m.Describe();
  struct stat st_b{};
  ASSERT_EQ(stat(mnt_b.c_str(), &st_b), 0) << strerror(errno);
  if (st_b.st_dev != st_a.st_dev) {
    // Another mount (a test running beside this one) took the number first.
    ASSERT_EQ(umount(mnt_b.c_str()), 0) << strerror(errno);
    guard_b.expect_mounted(false);
    GTEST_SKIP() << "the second mount got another device number; nothing to tell apart";
  }
  ASSERT_EQ(kill(daemon_a, SIGCONT), 0) << strerror(errno);
  EXPECT_TRUE(WaitUntil([&] { return TryFlock(a) != EWOULDBLOCK; })) << "the first daemon did not exit";
  EXPECT_TRUE(IsLiveMount(mnt_b)) << "the first daemon's exit took down the mount that got its device number";
  EXPECT_EQ(umount(mnt_b.c_str()), 0) << strerror(errno);
  guard_b.expect_mounted(false);
}

// A mount given relative paths, as `cd /var/tmp && deferfs mount fs.img
// /mnt`: the daemon leaves its working directory for /, and its metadata
// store must still find its directory when RocksDB next creates a file. A
// memtable filled with 64 KiB xattrs (about 600 of them: the memtable holds
// 32 MiB) makes it create a new WAL and a table file; before the fix that
// shut the filesystem down, and the next change failed with EIO.
TEST_F(CliTest, RelativePathsSurviveTheDaemonsChdir) {
  ASSERT_NO_FATAL_FAILURE(Mkfs(tmp_ / "fs.img"));
  const std::string value(64 << 10, 'v');
  for (const std::string meta : {"", "meta=fs.img.meta"}) {
    SCOPED_TRACE(meta.empty() ? "default metadata directory" : meta);
    MountGuard guard(mnt_, tmp_ / "fs.img");
    guard.expect_mounted(true);
    std::vector<std::string> argv{"env", "-C", tmp_.path(), DEFERFS_BIN, "mount", "fs.img", "mnt"};
    if (!meta.empty()) argv.insert(argv.end(), {"-o", meta});
    RunResult m = RunCommand(argv, 30s);
    ASSERT_TRUE(m.succeeded()) << m.Describe();
    const std::string f = mnt_ + "/f" + std::to_string(meta.size());
    UniqueFd fd(open(f.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    for (int i = 0; i < 1200; i++) {
      const std::string name = "user.big" + std::to_string(i % 4);
      ASSERT_EQ(setxattr(f.c_str(), name.c_str(), value.data(), value.size(), 0), 0)
          << "setxattr " << i << ": " << strerror(errno);
    }
    UniqueFd g(open((f + ".after").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    EXPECT_TRUE(g.ok()) << "a create after the memtable filled: " << strerror(errno);
    g = UniqueFd();
    fd = UniqueFd();
    ASSERT_EQ(umount(mnt_.c_str()), 0) << strerror(errno);
    guard.expect_mounted(false);
  }
  RunResult k = RunDeferfs({"fsck", tmp_ / "fs.img"});
  EXPECT_TRUE(k.succeeded()) << k.Describe();
}

// Another filesystem mounted over a deferfs, then the deferfs daemon told to
// stop: an unmount by path would reach the filesystem on top, so the daemon
// must leave it alone (its own mount stays behind, dead, under it).
TEST_F(CliTest, SignalledDaemonDoesNotUnmountAFilesystemOnTopOfIt) {
  const std::string lower = tmp_ / "lower.img", upper = tmp_ / "upper.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(lower));
  ASSERT_NO_FATAL_FAILURE(Mkfs(upper));
  MountGuard lower_guard(mnt_, lower);
  MountGuard upper_guard(mnt_, upper);
  lower_guard.expect_mounted(true);
  upper_guard.expect_mounted(true);
  RunResult a = MountBg(lower);
  ASSERT_TRUE(a.succeeded()) << a.Describe();
  RunResult b = MountBg(upper);
  ASSERT_TRUE(b.succeeded()) << b.Describe();
  const pid_t daemon = FlockHolder(lower);
  ASSERT_GT(daemon, 0);
  ASSERT_EQ(kill(daemon, SIGTERM), 0) << strerror(errno);
  ASSERT_TRUE(WaitUntil([&] { return TryFlock(lower) == 0; })) << "the signalled daemon did not exit";

  UniqueFd fd(open((mnt_ + "/still-here").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
  EXPECT_TRUE(fd.ok()) << "the filesystem on top went away: " << strerror(errno);
  fd = UniqueFd();
  EXPECT_EQ(TryFlock(upper), EWOULDBLOCK) << "the daemon of the filesystem on top exited";

  ASSERT_EQ(umount(mnt_.c_str()), 0) << strerror(errno);
  upper_guard.expect_mounted(false);
  ASSERT_TRUE(WaitUntil([&] { return TryFlock(upper) == 0; }));
  EXPECT_EQ(umount2(mnt_.c_str(), MNT_DETACH), 0) << "the dead deferfs underneath: " << strerror(errno);
  lower_guard.expect_mounted(false);
  EXPECT_FALSE(IsMounted(mnt_));
}

// The same with the mount on top moved there (`mount --move`) from a mount
// older than ours: mountinfo lists it before ours, so only the parent links
// say which of the two is on top.
TEST_F(CliTest, SignalledDaemonDoesNotUnmountAMountMovedOnTopOfIt) {
  const std::string img = tmp_ / "fs.img", older = tmp_ / "older";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  // MS_MOVE refuses a mount under a shared one (systemd's default for /):
  // both mounts go under a private bind of the test's directory.
  ASSERT_EQ(mount(tmp_.path().c_str(), tmp_.path().c_str(), nullptr, MS_BIND, nullptr), 0) << strerror(errno);
  struct Unbind {  // last: after the guards below unmounted what is inside
    std::string path;
    ~Unbind() { umount2(path.c_str(), MNT_DETACH); }
  } unbind{tmp_.path()};
  ASSERT_EQ(mount(nullptr, tmp_.path().c_str(), nullptr, MS_PRIVATE, nullptr), 0) << strerror(errno);
  ASSERT_EQ(mkdir(older.c_str(), 0755), 0);
  ASSERT_EQ(mount("deferfs-test", older.c_str(), "tmpfs", 0, "size=1m"), 0) << strerror(errno);
  MountGuard older_guard(older, "");
  older_guard.expect_mounted(true);
  MountGuard guard(mnt_, img);
  guard.expect_mounted(true);
  RunResult r = MountBg(img);
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  ASSERT_EQ(mount(older.c_str(), mnt_.c_str(), nullptr, MS_MOVE, nullptr), 0) << strerror(errno);
  const pid_t daemon = FlockHolder(img);
  ASSERT_GT(daemon, 0);
  ASSERT_EQ(kill(daemon, SIGTERM), 0) << strerror(errno);
  ASSERT_TRUE(WaitUntil([&] { return TryFlock(img) == 0; })) << "the signalled daemon did not exit";

  struct statfs top {};
  ASSERT_EQ(statfs(mnt_.c_str(), &top), 0) << strerror(errno);
  EXPECT_EQ(top.f_type, TMPFS_MAGIC) << "the moved tmpfs is no longer on top";

  ASSERT_EQ(umount(mnt_.c_str()), 0) << strerror(errno);
  EXPECT_EQ(umount2(mnt_.c_str(), MNT_DETACH), 0) << "the dead deferfs underneath: " << strerror(errno);
  guard.expect_mounted(false);
  EXPECT_FALSE(IsMounted(mnt_));
}

// A backing held by something that is not a mount (here the test itself,
// as an fsck or a daemon past its unmount would) is waited for: the command
// goes ahead once the holder lets go, well within the patience of 10 s. A
// wait past 1 s says so, which also shows the command met the lock.
TEST_F(CliTest, CommandsWaitForAHolderThatIsNotMounted) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  UniqueFd held(open(img.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(held.ok()) << strerror(errno);
  ASSERT_EQ(flock(held.get(), LOCK_EX | LOCK_NB), 0) << strerror(errno);
  std::thread release([&] {
    std::this_thread::sleep_for(2500ms);
    held = UniqueFd();  // closing drops the flock
  });
  RunResult r = RunDeferfs({"fsck", img});
  release.join();
  EXPECT_TRUE(r.succeeded()) << "refused instead of waiting: " << r.Describe();
  EXPECT_NE(r.err.find(img + " is in use by another process; waiting up to 10 s\n"), std::string::npos)
      << "the command did not wait, or did not say so: " << r.Describe();
}

// Pid of the daemon half of a background `deferfs mount` of `backing`: the
// process with that command line that leads its own session (it setsid()s
// after the fork; the waiting parent does not). -1 if there is none.
pid_t MountDaemonOf(const std::string& backing) {
  for (const auto& e : std::filesystem::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (!std::isdigit(static_cast<unsigned char>(name[0]))) continue;
    std::ifstream cmd(e.path() / "cmdline");
    std::string cmdline((std::istreambuf_iterator<char>(cmd)), std::istreambuf_iterator<char>());
    if (cmdline.find(std::string("mount") + '\0' + backing + '\0') == std::string::npos) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    if (getsid(pid) == pid) return pid;
  }
  return -1;
}

// A daemon that dies before its mount is up (here SIGKILL while it waits for
// the backing; a crash or the OOM killer alike) closes the pipe its parent
// waits on just as a ready one used to: the parent must not report success.
TEST_F(CliTest, MountFailsWhenItsDaemonDiesBeforeTheMountIsUp) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  MountGuard guard(mnt_, img);
  UniqueFd held(open(img.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(held.ok()) << strerror(errno);
  ASSERT_EQ(flock(held.get(), LOCK_EX | LOCK_NB), 0) << strerror(errno);  // the daemon waits up to 10 s
  RunResult r;
  std::thread mount([&] { r = MountBg(img); });
  pid_t daemon = -1;
  const bool found = WaitUntil([&] { return (daemon = MountDaemonOf(img)) > 0; });
  if (found) kill(daemon, SIGKILL);
  mount.join();
  ASSERT_TRUE(found) << "no daemon process found for " << img << ": " << r.Describe();
  EXPECT_FALSE(IsMounted(mnt_));
  EXPECT_TRUE(r.exited() && r.exit_code() != 0) << "the mount reported success: " << r.Describe();
  // Its last line (the wait for the backing may have said so before it).
  std::string last = r.err.substr(0, r.err.empty() ? 0 : r.err.size() - 1);
  last = last.substr(last.rfind('\n') == std::string::npos ? 0 : last.rfind('\n') + 1);
  EXPECT_EQ(last.rfind("deferfs: the mount daemon died before the mount was up (killed by ", 0), 0u) << r.Describe();
  EXPECT_NE(last.find("nothing is mounted"), std::string::npos) << r.Describe();
}

// A daemon killed by SIGKILL leaves its backing locked, served mark and all,
// for a moment after it is gone: the kernel tears its io_uring rings down in
// the background, and they hold the backing as a registered file. A mount
// right after the dead mount's umount waits for that, as for a daemon still
// finishing its unmount, instead of refusing the backing as mounted where it
// cannot see. The window is short (0.1-0.3 s): several rounds, each mounting
// at once, make meeting it near certain.
TEST_F(CliTest, MountRightAfterAKilledDaemonsUnmountWaitsForItsFiles) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  MountGuard guard(mnt_, img);
  guard.expect_mounted(true);
  AlignedBuf buf(1 << 20);
  RunResult m = MountBg(img);
  ASSERT_TRUE(m.succeeded()) << m.Describe();
  constexpr int kRounds = 5;
  for (int i = 0; i < kRounds; i++) {
    SCOPED_TRACE("round " + std::to_string(i));
    {  // IO through the daemon's rings before it dies
      UniqueFd fd(open((mnt_ + "/f" + std::to_string(i)).c_str(), O_CREAT | O_WRONLY | O_DIRECT, 0644));
      ASSERT_TRUE(fd.ok()) << strerror(errno);
      ASSERT_EQ(pwrite(fd.get(), buf.data(), buf.size(), 0), 1 << 20) << strerror(errno);
    }
    const pid_t daemon = FlockHolder(img);
    ASSERT_GT(daemon, 0);
    ASSERT_EQ(kill(daemon, SIGKILL), 0) << strerror(errno);
    ASSERT_TRUE(WaitUntil([&] { return Exited(daemon); })) << "the killed daemon did not exit";
    ASSERT_EQ(umount(mnt_.c_str()), 0) << strerror(errno);
    m = MountBg(img);
    ASSERT_TRUE(m.succeeded()) << m.Describe();
  }
  ASSERT_EQ(umount(mnt_.c_str()), 0) << strerror(errno);
  guard.expect_mounted(false);
}

// A mounted backing is refused at once, also when the mount table does not
// show which one it is (a mount with its own fsname=): the daemon's mark on
// the backing says so, not the mount table.
TEST_F(CliTest, MountedBackingIsRefusedWhateverItsSourceName) {
  MountConfig cfg;
  cfg.options = {"fsname=elsewhere"};
  MountedFs fs(cfg);
  ASSERT_TRUE(fs.ok());
  MountGuard guard(mnt_, "");
  EXPECT_TRUE(IsCliError(RunDeferfs({"mount", fs.backing(), mnt_}, 30s), "is mounted"));
  EXPECT_FALSE(IsMounted(mnt_));
  EXPECT_TRUE(IsCliError(RunDeferfs({"fsck", fs.backing()}, 30s), "is mounted"));
  EXPECT_TRUE(fs.Unmount());
}

// A backing mounted in another mount namespace (a container's; here one
// made by unshare) is refused at once, though this namespace shows no mount
// of it: a live process holds the daemon's served mark.
TEST_F(CliTest, BackingMountedInAnotherMountNamespaceIsRefused) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  MountGuard guard(mnt_, img);  // kills the daemon if the test does not stop it
  RunResult u = RunCommand({"unshare", "--mount", "--propagation", "private", DEFERFS_BIN, "mount", img, mnt_}, 30s);
  ASSERT_TRUE(u.succeeded()) << u.Describe();
  ASSERT_FALSE(IsMounted(mnt_)) << "the mount is visible here: no namespace of its own";
  const pid_t daemon = FlockHolder(img);
  ASSERT_GT(daemon, 0);
  // One line: refused without the wait (which says so after a second).
  EXPECT_TRUE(IsCliError(RunDeferfs({"mount", img, mnt_}, 30s), "is mounted (where this process cannot see it)"));
  EXPECT_FALSE(IsMounted(mnt_));
  EXPECT_TRUE(IsCliError(RunDeferfs({"fsck", img}, 30s), "is mounted"));
  ASSERT_EQ(kill(daemon, SIGTERM), 0) << strerror(errno);  // unmounts in its namespace
  EXPECT_TRUE(WaitUntil([&] { return TryFlock(img) == 0; })) << "the signalled daemon did not exit";
}

TEST_F(CliTest, SecondMountOfSameBackingFails) {
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  {
    UniqueFd fd(open(fs.path("before").c_str(), O_CREAT | O_WRONLY, 0644));
    ASSERT_TRUE(fd.ok());
    ASSERT_EQ(ftruncate(fd.get(), 1), 0);
  }
  MountGuard guard(mnt_, "");  // fs' own daemon rightly holds the backing
  EXPECT_TRUE(IsCliError(RunDeferfs({"mount", fs.backing(), mnt_}, 30s), "mounted at " + fs.root()));
  EXPECT_FALSE(IsMounted(mnt_));
  EXPECT_TRUE(IsCliError(RunDeferfs({"mount", fs.backing(), mnt_, "-f"}, 30s)));
  EXPECT_FALSE(IsMounted(mnt_));
  // The first mount is unaffected.
  ASSERT_TRUE(IsLiveMount(fs.root()));
  {
    UniqueFd fd(open(fs.path("after").c_str(), O_CREAT | O_RDWR, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(ftruncate(fd.get(), 2), 0) << strerror(errno);
  }
  struct stat st{};
  EXPECT_EQ(lstat(fs.path("before").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 1);
  EXPECT_TRUE(fs.Unmount());
}

TEST_F(CliTest, BackgroundMountIsReadyOnReturnAndExitsOnUnmount) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  MountGuard guard(mnt_, img);
  guard.expect_mounted(true);
  RunResult r = MountBg(img, {"-o", "allow_other"});
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  // The very next look at the mountpoint sees the mount.
  EXPECT_TRUE(IsLiveMount(mnt_));
  {
    UniqueFd fd(open((mnt_ + "/hello").c_str(), O_CREAT | O_RDWR, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(ftruncate(fd.get(), 2), 0) << strerror(errno);
  }
  EXPECT_EQ(TryFlock(img), EWOULDBLOCK) << "the daemon must hold an flock on the backing file";

  RunResult u = RunCommand({"fusermount3", "-u", mnt_});
  ASSERT_TRUE(u.succeeded()) << u.Describe();
  EXPECT_FALSE(IsMounted(mnt_));
  EXPECT_TRUE(WaitUntil([&] { return TryFlock(img) == 0; }))
      << "the daemon did not exit (release its flock) within 20s of the unmount";
  guard.expect_mounted(false);

  // And the new file made it: mount again in the foreground fixture.
  MountedFs fs(MountConfig::Existing(img));
  ASSERT_TRUE(fs.ok());
  struct stat st{};
  EXPECT_EQ(lstat(fs.path("hello").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 2);
}

TEST_F(CliTest, ForegroundMountExitsZeroOnSignal) {
  for (int sig : {SIGTERM, SIGINT}) {
    SCOPED_TRACE(strsignal(sig));
    MountedFs fs;
    ASSERT_TRUE(fs.ok());
    EXPECT_TRUE(fs.StopWithSignal(sig));
    EXPECT_FALSE(IsMounted(fs.root()));
    EXPECT_EQ(TryFlock(fs.backing()), 0);
  }
}

TEST_F(CliTest, HelpListsEveryCommandAndOptionWithDefaults) {
  RunResult top = RunDeferfs({"--help"});
  ASSERT_TRUE(top.succeeded()) << top.Describe();
  for (const char* cmd : {"mkfs", "mount", "stats", "fsck", "--version"}) {
    EXPECT_NE(top.out.find(cmd), std::string::npos) << "deferfs --help lacks " << cmd << ":\n" << top.out;
  }
  const std::vector<std::pair<std::string, std::vector<std::string>>> commands{
      {"mkfs", {"BACKING", "--size", "--meta", "--force", "--discard", "default"}},
      {"mount",
       {"BACKING", "MOUNTPOINT", "-o", "-f", "completion=", "default auto", "workers=", "pollers=", "cthreads=",
        "ring_depth=", "default 256", "meta=", "loglevel=", "default info", "ro", "allow_other", "noauto"}},
      {"stats", {"MOUNTPOINT", "--json", "--reset", "--watch", "--count", "N=0"}},
  };
  for (const auto& [cmd, words] : commands) {
    RunResult r = RunDeferfs({cmd, "--help"});
    ASSERT_TRUE(r.succeeded()) << r.Describe();
    EXPECT_EQ(r.err, "");
    for (const std::string& w : words) {
      EXPECT_NE(r.out.find(w), std::string::npos) << "deferfs " << cmd << " --help lacks " << w << ":\n" << r.out;
    }
  }
}

TEST_F(CliTest, VersionPrintsTheVersion) {
  RunResult r = RunDeferfs({"--version"});
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  EXPECT_EQ(r.out.rfind("deferfs ", 0), 0u) << r.out;
  EXPECT_TRUE(std::isdigit(static_cast<unsigned char>(r.out[8]))) << r.out;
}

TEST_F(CliTest, NoCommandOrUnknownOptionIsNamed) {
  EXPECT_TRUE(IsCliError(RunDeferfs({}), "deferfs --help"));
  EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", tmp_ / "x", "--bogus"}), "--bogus"));
  EXPECT_TRUE(IsCliError(RunDeferfs({"stats"}), "MOUNTPOINT"));
  EXPECT_TRUE(IsCliError(RunDeferfs({"mount", tmp_ / "x"}), "MOUNTPOINT"));
  EXPECT_TRUE(IsCliError(RunDeferfs({"stats", mnt_, "--watch", "--count", "many"}), "--count"));
  EXPECT_TRUE(IsCliError(RunDeferfs({"stats", mnt_, "--watch", "--json"}), "--json"));
  EXPECT_FALSE(Exists(tmp_ / "x"));
}

TEST_F(CliTest, RepeatedDashOOptionsAddUp) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  MountGuard guard(mnt_, img);
  guard.expect_mounted(true);
  RunResult r = MountBg(img, {"-o", "completion=defer", "-o", "workers=2,pollers=2"});
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  RunResult st = RunDeferfs({"stats", mnt_, "--json"});
  EXPECT_TRUE(st.succeeded()) << st.Describe();
  EXPECT_NE(st.out.find("\"mode\":\"defer\""), std::string::npos) << st.out;
  EXPECT_NE(st.out.find("\"threads\":{\"workers\":2,\"pollers\":2,"), std::string::npos) << st.out;
  ASSERT_TRUE(RunCommand({"fusermount3", "-u", mnt_}).succeeded());
  EXPECT_TRUE(WaitUntil([&] { return TryFlock(img) == 0; }));
  guard.expect_mounted(false);
}

TEST_F(CliTest, LogLevelOption) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img));
  {
    MountGuard guard(mnt_, img);
    EXPECT_TRUE(IsCliError(MountBg(img, {"-o", "loglevel=loud"}), "loglevel"));
    RunResult r = MountBg(img, {"-o", "loglevel=loud"});
    EXPECT_NE(r.err.find("debug"), std::string::npos) << "the accepted values are named: " << r.Describe();
    EXPECT_FALSE(IsMounted(mnt_));
  }
  std::string log;
  {
    MountedFs fs(MountConfig::Existing(img));  // default level: info
    ASSERT_TRUE(fs.ok());
    ASSERT_TRUE(fs.Unmount());
    log = fs.DaemonLog();
  }
  // The configuration, once, at start; and the unmount.
  size_t first = log.find("deferfs: mounted " + img);
  ASSERT_NE(first, std::string::npos) << log;
  EXPECT_EQ(log.find("deferfs: mounted", first + 1), std::string::npos) << "logged twice:\n" << log;
  for (const char* key : {"completion=", "workers=", "pollers=", "cthreads=", "ring_depth=", "rw", "metadata "}) {
    EXPECT_NE(log.find(key, first), std::string::npos) << "start line lacks " << key << ":\n" << log;
  }
  EXPECT_NE(log.find("deferfs: unmounted"), std::string::npos) << log;

  MountConfig quiet = MountConfig::Existing(img);
  quiet.options = {"loglevel=warn"};
  MountedFs fs(quiet);
  ASSERT_TRUE(fs.ok());
  ASSERT_TRUE(fs.Unmount());
  EXPECT_EQ(fs.DaemonLog().find("mounted"), std::string::npos) << fs.DaemonLog();
}

TEST_F(CliTest, StatsWatchPrintsRatesOncePerRefreshWhenPiped) {
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  // Writes keep going while the watch runs, so the rate must show them.
  UniqueFd fd(open(fs.path("w").c_str(), O_CREAT | O_RDWR | O_DIRECT, 0644));
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    void* p = nullptr;
    if (posix_memalign(&p, 4096, 4096) != 0) return;
    memset(p, 'x', 4096);
    for (off_t off = 0; !stop.load(); off = (off + 4096) % (16 << 20)) {
      if (pwrite(fd.get(), p, 4096, off) != 4096) break;
    }
    free(p);
  });
  RunResult r = RunDeferfs({"stats", fs.root(), "--watch", "--count", "2"});
  stop = true;
  writer.join();
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  EXPECT_EQ(r.out.find('\033'), std::string::npos) << "escape codes in piped output:\n" << r.out;
  size_t blocks = 0;
  for (size_t at = 0; (at = r.out.find("deferfs stats ", at)) != std::string::npos; at++) blocks++;
  EXPECT_EQ(blocks, 2u) << r.out;
  // The last block's counter rows: "NAME  TOTAL  RATE" with RATE > 0 (the
  // FUSE requests are counters too, each write one of them).
  std::string name;
  double rate = -1;
  for (const char* counter : {"dio.writes", "fuse.dev_requests"}) {
    size_t row = r.out.rfind("\n" + std::string(counter) + " ");
    ASSERT_NE(row, std::string::npos) << counter << ":\n" << r.out;
    std::istringstream is(r.out.substr(row + 1));
    double total = -1;
    rate = -1;
    is >> name >> total >> rate;
    EXPECT_GT(total, 0) << counter << ":\n" << r.out;
    EXPECT_GT(rate, 0) << "no " << counter << " rate while writes ran:\n" << r.out;
  }
  for (const char* w : {"per second", "p50", "p99", "write_reply"}) {
    EXPECT_NE(r.out.find(w), std::string::npos) << r.out;
  }
  // The last block's write_reply row: "write_reply  RATE  P50  P99  MAX".
  size_t row = r.out.rfind("\nwrite_reply ");
  ASSERT_NE(row, std::string::npos) << r.out;
  std::istringstream lat(r.out.substr(row + 1));
  double p50 = -1;
  lat >> name >> rate >> p50;
  EXPECT_GT(p50, 0) << "no write latency in an interval full of writes:\n" << r.out;
}

// --watch's percentiles cover the last interval, not the mount's life: once
// the writes have stopped, an idle interval has none, though `stats` (the
// lifetime view) still shows them.
TEST_F(CliTest, StatsWatchLatencyCoversTheLastIntervalOnly) {
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  {
    UniqueFd fd(open(fs.path("w").c_str(), O_CREAT | O_RDWR | O_DIRECT, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    void* p = nullptr;
    ASSERT_EQ(posix_memalign(&p, 4096, 4096), 0);
    memset(p, 'x', 4096);
    for (off_t off = 0; off < 64 * 4096; off += 4096) ASSERT_EQ(pwrite(fd.get(), p, 4096, off), 4096);
    free(p);
  }
  RunResult plain = RunDeferfs({"stats", fs.root()});
  ASSERT_TRUE(plain.succeeded()) << plain.Describe();
  size_t row = plain.out.find("latency.write_reply.p50_us ");
  ASSERT_NE(row, std::string::npos) << plain.out;
  EXPECT_GT(std::strtod(plain.out.c_str() + row + 27, nullptr), 0) << plain.out;
  EXPECT_EQ(plain.out.find("histogram"), std::string::npos) << "a histogram in the table:\n" << plain.out;

  RunResult idle = RunDeferfs({"stats", fs.root(), "--watch", "--count", "1"});
  ASSERT_TRUE(idle.succeeded()) << idle.Describe();
  EXPECT_NE(idle.out.find("last interval"), std::string::npos) << idle.out;
  row = idle.out.rfind("\nwrite_reply ");
  ASSERT_NE(row, std::string::npos) << idle.out;
  std::istringstream is(idle.out.substr(row + 1));
  std::string name, rate, p50, p99;
  is >> name >> rate >> p50 >> p99;
  EXPECT_EQ(rate, "0") << idle.out;
  EXPECT_EQ(p50, "-") << "lifetime percentiles in an idle interval:\n" << idle.out;
  EXPECT_EQ(p99, "-") << idle.out;
}

TEST_F(CliTest, StatsWatchStopsCleanlyOnSignal) {
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  for (int sig : {SIGINT, SIGTERM}) {
    SCOPED_TRACE(strsignal(sig));
    int out[2];
    ASSERT_EQ(pipe2(out, O_CLOEXEC), 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
    std::string root = fs.root();
    char* argv[] = {const_cast<char*>(DEFERFS_BIN), const_cast<char*>("stats"), root.data(),
                    const_cast<char*>("--watch"), nullptr};
    pid_t pid = -1;
    ASSERT_EQ(posix_spawn(&pid, DEFERFS_BIN, &fa, nullptr, argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    // Wait for the first refresh (blocking read), then interrupt.
    std::string got;
    char buf[4096];
    for (ssize_t n; got.find("latency") == std::string::npos && (n = read(out[0], buf, sizeof(buf))) > 0;) {
      got.append(buf, static_cast<size_t>(n));
    }
    EXPECT_NE(got.find("deferfs stats"), std::string::npos) << got;
    ASSERT_EQ(kill(pid, sig), 0);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    close(out[0]);
    EXPECT_TRUE(WIFEXITED(status)) << "killed by the signal instead of stopping";
    EXPECT_EQ(WIFEXITED(status) ? WEXITSTATUS(status) : -1, 0);
  }
}

TEST_F(CliTest, MkfsDiscardPunchesTheDataAreaQuietlyWhenPiped) {
  const std::string img = tmp_ / "full.img";
  {
    std::ofstream out(img, std::ios::binary);
    std::string chunk(1 << 20, 'z');
    for (int i = 0; i < 32; i++) out.write(chunk.data(), static_cast<std::streamsize>(chunk.size()));
  }
  struct stat st{};
  ASSERT_EQ(stat(img.c_str(), &st), 0);
  ASSERT_GE(st.st_blocks * 512, 32 << 20);
  RunResult r = RunDeferfs({"mkfs", img, "--discard"});
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  EXPECT_EQ(r.err, "") << "progress output although stderr is not a terminal";
  ASSERT_EQ(stat(img.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 32 << 20);
  EXPECT_LT(st.st_blocks * 512, 1 << 20) << "the data area was not punched";
  std::string tail = ReadHead(img, 32 << 20).substr(1 << 20);
  EXPECT_EQ(tail, std::string(tail.size(), '\0'));
  MountedFs fs(MountConfig::Existing(img));
  EXPECT_TRUE(fs.ok());
}

// Sets an environment variable for the commands a test runs, and restores
// it when the test leaves the scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = getenv(name)) old_ = old;
    setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// mkfs --force with --discard and a smaller --size destroys the old
// filesystem's data: it does so only after the new superblock is written,
// so a discard that fails (here: a host file system that cannot punch
// holes) leaves the new filesystem whole and says so, where it used to leave
// the old one shrunk, partly punched and refused by every mount.
TEST_F(CliTest, MkfsDiscardThatFailsLeavesTheNewFilesystemWhole) {
  const std::string img = tmp_ / "fs.img";
  ASSERT_NO_FATAL_FAILURE(Mkfs(img, "64M"));
  {
    MountedFs fs(MountConfig::Existing(img));
    ASSERT_TRUE(fs.ok());
    UniqueFd fd(open(fs.path("old-file").c_str(), O_CREAT | O_WRONLY, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(write(fd.get(), "old", 3), 3);
  }
  RunResult r;
  {
    ScopedEnv preload("LD_PRELOAD", DEFERFS_FAIL_PUNCH);
    const char* asan = getenv("ASAN_OPTIONS");
    ScopedEnv asan_order("ASAN_OPTIONS", std::string(asan ? asan : "") + ":verify_asan_link_order=0");
    r = RunDeferfs({"mkfs", img, "--force", "--discard", "--size", "48M"});
  }
  EXPECT_TRUE(IsCliError(r, "discarding its blocks failed")) << "the shim did not make the discard fail?";
  EXPECT_NE(r.err.find("usable as it is"), std::string::npos) << r.Describe();
  EXPECT_NE(r.out.find("deferfs: formatted " + img), std::string::npos) << r.Describe();
  EXPECT_EQ(SizeOf(img), 48 << 20);
  MountedFs fs(MountConfig::Existing(img));
  ASSERT_TRUE(fs.ok()) << "the backing is left unmountable";
  struct stat st{};
  EXPECT_EQ(Err(lstat(fs.path("old-file").c_str(), &st)), ENOENT) << "the old filesystem is still there";
  UniqueFd fd(open(fs.path("new-file").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  EXPECT_EQ(fsync(fd.get()), 0) << strerror(errno);
}

}  // namespace
}  // namespace deferfs_test
