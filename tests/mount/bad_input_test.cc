// Damaged backing files and command-line mistakes that cli_test.cc does not
// cover: a truncated backing file, a superblock with a bad checksum, a future
// or past format version or impossible geometry, every numeric mount option
// out of range, and stats/mkfs misuse. Each must be refused with one line
// "deferfs: ..." on stderr and a non-zero exit, and leave the backing file
// and its metadata directory exactly as they were.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/cli_error.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using namespace std::chrono_literals;

// ------------------------------------------------------------------ helpers

std::string ReadAll(const std::string& p) {
  UniqueFd fd(open(p.c_str(), O_RDONLY | O_CLOEXEC));
  struct stat st{};
  if (!fd.ok() || fstat(fd.get(), &st) != 0) return "";
  std::string s(static_cast<size_t>(st.st_size), '\0');
  size_t n = 0;
  for (ssize_t r; n < s.size() && (r = pread(fd.get(), s.data() + n, s.size() - n, static_cast<off_t>(n))) > 0;) {
    n += static_cast<size_t>(r);
  }
  s.resize(n);
  return s;
}

void WriteAt(const std::string& p, off_t off, const void* data, size_t n) {
  UniqueFd fd(open(p.c_str(), O_WRONLY | O_CLOEXEC));
  ASSERT_TRUE(fd.ok()) << p << ": " << strerror(errno);
  ASSERT_EQ(pwrite(fd.get(), data, n, off), static_cast<ssize_t>(n));
}

// relative path -> size and mtime of everything under `dir`, RocksDB's info
// log (LOG*, diagnostic output that a refused open may still append to) left out.
std::map<std::string, std::string> TreeState(const std::string& dir) {
  std::map<std::string, std::string> out;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (it->path().filename().string().rfind("LOG", 0) == 0) continue;
    struct stat st{};
    lstat(it->path().c_str(), &st);
    std::ostringstream os;
    os << "size=" << st.st_size << " mtime=" << st.st_mtim.tv_sec << "." << st.st_mtim.tv_nsec;
    out[it->path().lexically_relative(dir).string()] = os.str();
  }
  return out;
}

// CRC-32C (Castagnoli, reflected), bit by bit: the superblock's checksum.
uint32_t Crc32c(const uint8_t* p, size_t n) {
  uint32_t crc = ~0u;
  for (size_t i = 0; i < n; i++) {
    crc ^= p[i];
    for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}

// The superblock's on-disk layout (backend/superblock.cc): magic[8],
// version u32, block_size u32, uuid[16], device_bytes u64,
// first_data_block u64, created_ns i64, crc u32 over the bytes before it.
constexpr size_t kVersionAt = 8, kBlockSizeAt = 12, kUuidAt = 16, kDeviceBytesAt = 32, kCrcAt = 56;

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (getenv("DEFERFS_TEST_DIR") != nullptr) GTEST_SKIP() << "needs deferfs itself";
    ASSERT_FALSE(tmp_.path().empty());
    ASSERT_EQ(mkdir(mnt_.c_str(), 0755), 0);
  }
  void TearDown() override {
    // Nothing may stay mounted after a refused mount; clean up if it did.
    EXPECT_FALSE(IsMounted(mnt_)) << "a refused mount left " << mnt_ << " mounted";
    if (IsMounted(mnt_)) RunCommand({"fusermount3", "-u", mnt_});
  }

  void Mkfs(const std::string& size = "64M") {
    RunResult r = RunDeferfs({"mkfs", img_, "--size", size});
    ASSERT_TRUE(r.succeeded()) << r.Describe();
  }
  RunResult Mount(std::vector<std::string> extra = {}) {
    std::vector<std::string> args{"mount", img_, mnt_};
    args.insert(args.end(), extra.begin(), extra.end());
    return RunDeferfs(args, 30s);
  }
  // Rewrites a superblock field and, if `fix_crc`, a matching checksum.
  template <typename T>
  void Poke(size_t at, T value, bool fix_crc) {
    std::string sb = ReadAll(img_).substr(0, 4096);
    std::memcpy(sb.data() + at, &value, sizeof value);
    if (fix_crc) {
      uint32_t crc = Crc32c(reinterpret_cast<const uint8_t*>(sb.data()), kCrcAt);
      std::memcpy(sb.data() + kCrcAt, &crc, sizeof crc);
    }
    ASSERT_NO_FATAL_FAILURE(WriteAt(img_, 0, sb.data(), sb.size()));
  }
  // A mount of the damaged image must be refused and change nothing.
  void ExpectRefused(std::string_view mention) {
    const std::string before = ReadAll(img_);
    const auto meta = TreeState(img_ + ".meta");
    EXPECT_TRUE(IsCliError(Mount(), mention));
    EXPECT_FALSE(IsMounted(mnt_));
    EXPECT_TRUE(ReadAll(img_) == before) << "the backing file changed";
    EXPECT_EQ(TreeState(img_ + ".meta"), meta);
  }

  TempDir tmp_;
  const std::string mnt_ = tmp_ / "mnt";
  const std::string img_ = tmp_ / "fs.img";
};

// ------------------------------------------------------------ damaged backing

TEST_F(BadInputTest, TruncatedBackingFileIsRefused) {
  ASSERT_NO_FATAL_FAILURE(Mkfs());
  ASSERT_EQ(truncate(img_.c_str(), 48 << 20), 0);
  ExpectRefused("shorter");
  // Smaller than even a superblock.
  ASSERT_EQ(truncate(img_.c_str(), 1000), 0);
  ExpectRefused("small");
}

TEST_F(BadInputTest, TruncationKeepsTheSuperblockButNotTheData) {
  ASSERT_NO_FATAL_FAILURE(Mkfs());
  ASSERT_EQ(truncate(img_.c_str(), (64 << 20) - 4096), 0);  // one block short
  ExpectRefused("shorter");
  ASSERT_EQ(truncate(img_.c_str(), 64 << 20), 0);  // restored: mounts
  MountedFs fs(MountConfig::Existing(img_));
  EXPECT_TRUE(fs.ok());
}

TEST_F(BadInputTest, SuperblockWithBadChecksumIsRefused) {
  ASSERT_NO_FATAL_FAILURE(Mkfs());
  const std::string sb = ReadAll(img_).substr(0, 4096);
  for (size_t at : {kVersionAt, kUuidAt + 5, kDeviceBytesAt + 2, kCrcAt}) {
    SCOPED_TRACE("byte " + std::to_string(at) + " flipped");
    ASSERT_NO_FATAL_FAILURE(Poke<uint8_t>(at, static_cast<uint8_t>(sb[at] ^ 0x10), false));
    ExpectRefused("checksum");
    ASSERT_NO_FATAL_FAILURE(WriteAt(img_, 0, sb.data(), sb.size()));
  }
  // A flipped magic byte: not recognized as deferfs at all.
  ASSERT_NO_FATAL_FAILURE(Poke<uint8_t>(0, static_cast<uint8_t>(sb[0] ^ 0x01), false));
  ExpectRefused("not a deferfs");
  ASSERT_NO_FATAL_FAILURE(WriteAt(img_, 0, sb.data(), sb.size()));
  MountedFs fs(MountConfig::Existing(img_));  // the original still mounts
  EXPECT_TRUE(fs.ok());
}

TEST_F(BadInputTest, OtherFormatVersionIsRefused) {
  ASSERT_NO_FATAL_FAILURE(Mkfs());
  for (uint32_t v : {2u, 0u, 0xffffffffu}) {
    SCOPED_TRACE("version " + std::to_string(v));
    ASSERT_NO_FATAL_FAILURE(Poke<uint32_t>(kVersionAt, v, true));
    ExpectRefused("version " + std::to_string(v));
  }
}

TEST_F(BadInputTest, ImpossibleGeometryIsRefused) {
  ASSERT_NO_FATAL_FAILURE(Mkfs());
  const std::string sb = ReadAll(img_).substr(0, 4096);
  ASSERT_NO_FATAL_FAILURE(Poke<uint32_t>(kBlockSizeAt, 512, true));
  ExpectRefused("superblock");
  ASSERT_NO_FATAL_FAILURE(WriteAt(img_, 0, sb.data(), sb.size()));
  ASSERT_NO_FATAL_FAILURE(Poke<uint64_t>(kDeviceBytesAt, (64ull << 20) + 100, true));  // not whole blocks
  ExpectRefused("superblock");
  ASSERT_NO_FATAL_FAILURE(WriteAt(img_, 0, sb.data(), sb.size()));
  ASSERT_NO_FATAL_FAILURE(Poke<uint64_t>(kDeviceBytesAt, 4096, true));  // too small to be a deferfs
  ExpectRefused("superblock");
}

// --------------------------------------------------------- mount options

TEST_F(BadInputTest, EveryNumericMountOptionOutOfRange) {
  ASSERT_NO_FATAL_FAILURE(Mkfs());
  const std::vector<std::pair<std::string, std::string>> cases{
      {"workers=65", "workers"},       {"workers=-1", "workers"},       {"workers=1x", "workers"},
      {"workers=99999999999", "workers"}, {"pollers=0", "pollers"},     {"pollers=17", "pollers"},
      {"cthreads=0", "cthreads"},      {"cthreads=65", "cthreads"},     {"ring_depth=4", "ring_depth"},
      {"ring_depth=8192", "ring_depth"}, {"ring_depth=100", "ring_depth"}, {"ring_depth=", "ring_depth"},
      {"meta=", "meta"},               {"completion=", "completion"},   {"completion=DEFER,bogus", "completion"},
      {"uring_depth=0", "uring_depth"}, {"uring_depth=257", "uring_depth"}, {"transport=", "transport"},
      {"transport=tcp", "transport"},
  };
  const std::string before = ReadAll(img_);
  const auto meta = TreeState(img_ + ".meta");
  for (const auto& [opt, mention] : cases) {
    SCOPED_TRACE("-o " + opt);
    EXPECT_TRUE(IsCliError(Mount({"-o", opt}), mention));
    EXPECT_FALSE(IsMounted(mnt_));
    if (IsMounted(mnt_)) RunCommand({"fusermount3", "-u", mnt_});
  }
  EXPECT_TRUE(ReadAll(img_) == before);
  EXPECT_EQ(TreeState(img_ + ".meta"), meta);
}

TEST_F(BadInputTest, MalformedMountCommandLines) {
  ASSERT_NO_FATAL_FAILURE(Mkfs());
  const std::vector<std::vector<std::string>> cases{
      {"mount", img_, mnt_, "-o"},             // -o without its value
      {"mount", img_, mnt_, "--bogus"},        // unknown flag
      {"mount", img_, mnt_, "extra"},          // one argument too many
      {"mount", img_},                         // no mountpoint
      {"mount"},                               // nothing
      {"mount", "", mnt_},                     // empty backing path
  };
  for (const auto& args : cases) {
    std::string shown;
    for (const auto& a : args) shown += " '" + a + "'";
    SCOPED_TRACE("deferfs" + shown);
    EXPECT_TRUE(IsCliError(RunDeferfs(args, 30s)));
    EXPECT_FALSE(IsMounted(mnt_));
    if (IsMounted(mnt_)) RunCommand({"fusermount3", "-u", mnt_});
  }
}

// ------------------------------------------------------------ stats, mkfs

TEST_F(BadInputTest, StatsOfWhatIsNotADeferfsMount) {
  EXPECT_TRUE(IsCliError(RunDeferfs({"stats"})));
  EXPECT_TRUE(IsCliError(RunDeferfs({"stats", tmp_.path()}), "not a deferfs"));
  EXPECT_TRUE(IsCliError(RunDeferfs({"stats", tmp_ / "missing"})));
  EXPECT_TRUE(IsCliError(RunDeferfs({"stats", tmp_.path(), "--bogus"})));
  const std::string file = tmp_ / "file";
  ASSERT_EQ(close(open(file.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644)), 0);
  EXPECT_TRUE(IsCliError(RunDeferfs({"stats", file})));
}

TEST_F(BadInputTest, MkfsOfImpossibleTargets) {
  const std::string dir = tmp_ / "a-dir";
  ASSERT_EQ(mkdir(dir.c_str(), 0755), 0);
  EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", dir, "--size", "64M"})));
  EXPECT_TRUE(std::filesystem::is_empty(dir));
  EXPECT_FALSE(std::filesystem::exists(dir + ".meta"));

  // The metadata directory cannot be created below a regular file: nothing
  // may be left behind, neither a formatted backing nor half a meta dir.
  const std::string file = tmp_ / "plain";
  ASSERT_EQ(close(open(file.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644)), 0);
  EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img_, "--size", "64M", "--meta", file + "/meta"})));
  EXPECT_FALSE(std::filesystem::exists(img_ + ".meta"));
  if (std::filesystem::exists(img_)) {
    std::string head = ReadAll(img_).substr(0, 8);
    EXPECT_NE(head, "DEFERFS1") << "a failed mkfs left a formatted backing file";
  }
  EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img_, "--size", "lots"}), "size"));
  EXPECT_TRUE(IsCliError(RunDeferfs({"mkfs", img_, "--size", "-64M"}), "size"));
}

}  // namespace
}  // namespace deferfs_test
