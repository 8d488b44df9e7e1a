// Crash consistency: the daemon is SIGKILLed at a random moment of a mixed
// workload (O_DIRECT writes at depth through io_uring, buffered and O_DSYNC
// writes, fsync/fdatasync/syncfs, truncates, punches, fallocate, renames,
// creates and unlinks, the kernel forgetting inodes), in every completion
// mode, many rounds. Each crash is a power cut: the device loses every
// write that no flush or FUA write made durable (MountConfig::power_cut),
// and the metadata store's files lose what no sync covered or, every other
// pair of rounds, keep all that reached their filesystem, so that a record
// written there ahead of its data's flush shows. (The undo log reads what
// each write overwrites first, one at a time, so device IO overlaps less
// than it would without it.) After each crash the mount must recover by
// itself, and then:
//  - every block a durability point promised (fsync, fdatasync or O_DSYNC
//    returned before the kill) holds that write or a later one,
//    unless a later truncate/punch/unlink of the file may have removed it;
//  - no block of any file shows bytes it was never given: each block is all
//    zeros or a block this test wrote to exactly that file and offset (the
//    backing is pre-filled with a non-zero pattern, so stale blocks show);
//  - `deferfs fsck` finds nothing wrong.
//
// The workload runs in a child process that logs its promises to a file
// outside the mount: a promise only after its durability call returned, a
// "void" before the operation that may undo one.
//
// DEFERFS_CRASH_ROUNDS (default 6) sets rounds per mode; DEFERFS_CRASH_SEED
// replays a failing run (the seed is in the failure message).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "backend/fault_inject.h"
#include "tests/mount/io_helpers.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using namespace std::chrono_literals;

constexpr uint8_t kStale = 0x5A;  // the backing's pre-fill
constexpr size_t kBlock = 4096;
constexpr uint64_t kMaxBlocks = 48;  // per file
constexpr char kMagic[8] = {'D', 'F', 'S', 'C', 'R', 'A', 'S', 'H'};
const char* const kDirs[] = {"d0", "d1"};

// Every block the workload writes says what it is: file id, block, version
// (global and increasing), and a body derived from them.
struct BlockHeader {
  char magic[8];
  uint64_t file;
  uint64_t block;
  uint64_t version;
};

uint8_t BodyByte(uint64_t file, uint64_t block, uint64_t version) {
  uint8_t b = static_cast<uint8_t>(file * 131 + block * 31 + version * 7 + 1);
  return b == kStale ? b + 1 : b;
}

void FillBlock(uint8_t* p, uint64_t file, uint64_t block, uint64_t version) {
  BlockHeader h;
  std::memcpy(h.magic, kMagic, sizeof kMagic);
  h.file = file;
  h.block = block;
  h.version = version;
  std::memset(p, BodyByte(file, block, version), kBlock);
  std::memcpy(p, &h, sizeof h);
}

// 0 for an all-zero block, the version for a valid block of (file, block),
// and -1 (with *why) for anything else.
int64_t CheckBlock(const uint8_t* p, uint64_t file, uint64_t block, std::string* why) {
  bool zero = true;
  for (size_t i = 0; i < kBlock && zero; i++) zero = p[i] == 0;
  if (zero) return 0;
  BlockHeader h;
  std::memcpy(&h, p, sizeof h);
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) {
    *why = p[0] == kStale ? "stale device bytes" : "bytes the test never wrote";
    return -1;
  }
  if (h.file != file || h.block != block) {
    *why = "the block of file " + std::to_string(h.file) + " block " + std::to_string(h.block);
    return -1;
  }
  const uint8_t body = BodyByte(file, block, h.version);
  for (size_t i = sizeof h; i < kBlock; i++) {
    if (p[i] != body) {
      *why = "a torn block (version " + std::to_string(h.version) + ", byte " + std::to_string(i) + ")";
      return -1;
    }
  }
  return static_cast<int64_t>(h.version);
}

std::string FileName(uint64_t id) { return "f" + std::to_string(id); }

// ------------------------------------------------------------- the workload

// Runs in the forked child until an operation fails (the daemon is gone).
// Log lines: "P file block version" (promised), "V file from to" (blocks
// [from, to) may have been removed by what follows).
class Workload {
 public:
  Workload(std::string root, int log_fd, uint64_t seed) : root_(std::move(root)), log_(log_fd), rng_(seed) {}

  void Run() {
    if (posix_memalign(reinterpret_cast<void**>(&buf_), kBlock, kBlock * 8) != 0) return;
    for (const char* d : kDirs) mkdir((root_ + "/" + d).c_str(), 0755);
    for (int i = 0; i < 6; i++) Create();
    // Make the starting set durable so most rounds have promises to check.
    for (uint64_t id = 1; id < next_id_; id++) {
      if (!FsyncFile(id, false)) return;
    }
    for (;;) {
      bool ok = true;
      switch (Pick({20, 10, 8, 8, 5, 5, 6, 6, 5, 4, 4, 3, 2})) {
        case 0: ok = DirectWritesAtDepth(); break;
        case 1: ok = BufferedWrite(); break;
        case 2: ok = DsyncWrite(); break;
        case 3: ok = AnyFile() ? FsyncFile(RandomFile(), Pick({1, 1}) == 1) : Create(); break;
        case 4: ok = SyncFs(); break;
        case 5: ok = Truncate(); break;
        case 6: ok = Punch(); break;
        case 7: ok = Fallocate(); break;
        case 8: ok = Rename(); break;
        case 9: ok = Create(); break;
        case 10: ok = Unlink(); break;
        case 11: ok = Reopen(); break;
        case 12: ok = ForgetInodes(); break;
      }
      if (!ok) return;
    }
  }

 private:
  struct File {
    std::string dir;
    std::map<uint64_t, uint64_t> written;  // block -> version, as this process last wrote it
  };

  size_t Pick(std::initializer_list<double> weights) {
    std::discrete_distribution<size_t> d(weights);
    return d(rng_);
  }
  uint64_t Rand(uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_); }
  std::string Path(uint64_t id) const { return root_ + "/" + files_.at(id).dir + "/" + FileName(id); }
  bool AnyFile() const { return !files_.empty(); }
  uint64_t RandomFile() {
    auto it = files_.begin();
    std::advance(it, static_cast<long>(Rand(files_.size())));
    return it->first;
  }

  void Log(const std::string& line) {
    std::string l = line + "\n";
    if (write(log_, l.data(), l.size()) != static_cast<ssize_t>(l.size())) _exit(4);
  }
  void Promise(uint64_t id) {
    for (auto [blk, ver] : files_[id].written) Log("P " + std::to_string(id) + " " + std::to_string(blk) + " " + std::to_string(ver));
  }
  void Void(uint64_t id, uint64_t from, uint64_t to) {
    Log("V " + std::to_string(id) + " " + std::to_string(from) + " " + std::to_string(to));
  }

  // Fills buf_ with n blocks for file id from block `first`; records them.
  void Prepare(uint64_t id, uint64_t first, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) {
      uint64_t ver = ++version_;
      FillBlock(buf_ + i * kBlock, id, first + i, ver);
      files_[id].written[first + i] = ver;
    }
  }

  bool Create() {
    uint64_t id = next_id_++;
    files_[id].dir = kDirs[Rand(2)];
    UniqueFd fd(open(Path(id).c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644));
    return fd.ok();
  }

  bool DirectWritesAtDepth() {
    if (!AnyFile()) return Create();
    uint64_t id = RandomFile();
    UniqueFd fd(open(Path(id).c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC));
    if (!fd.ok()) return false;
    constexpr unsigned kDepth = 8;
    io_uring ring;
    if (io_uring_queue_init(kDepth, &ring, 0) < 0) return false;
    std::vector<uint8_t*> bufs;
    bool ok = true;
    for (unsigned i = 0; i < kDepth; i++) {
      uint8_t* b = nullptr;
      if (posix_memalign(reinterpret_cast<void**>(&b), kBlock, kBlock) != 0) break;
      bufs.push_back(b);
      uint64_t blk = Rand(kMaxBlocks);
      uint64_t ver = ++version_;
      FillBlock(b, id, blk, ver);
      files_[id].written[blk] = ver;
      io_uring_sqe* sqe = io_uring_get_sqe(&ring);
      io_uring_prep_write(sqe, fd.get(), b, kBlock, blk * kBlock);
    }
    // Two writes to one block in the same batch may land in either order;
    // keep only blocks written once in the batch as known.
    std::map<uint64_t, int> seen;
    for (uint8_t* b : bufs) {
      BlockHeader h;
      std::memcpy(&h, b, sizeof h);
      seen[h.block]++;
    }
    for (auto [blk, n] : seen) {
      if (n > 1) files_[id].written.erase(blk);  // either may win: promise neither
    }
    if (io_uring_submit(&ring) != static_cast<int>(bufs.size())) ok = false;
    for (size_t i = 0; ok && i < bufs.size(); i++) {
      io_uring_cqe* cqe;
      if (io_uring_wait_cqe(&ring, &cqe) < 0 || cqe->res != static_cast<int>(kBlock)) ok = false;
      else io_uring_cqe_seen(&ring, cqe);
    }
    io_uring_queue_exit(&ring);
    for (uint8_t* b : bufs) free(b);
    return ok;
  }

  bool BufferedWrite() {
    if (!AnyFile()) return Create();
    uint64_t id = RandomFile();
    UniqueFd fd(open(Path(id).c_str(), O_WRONLY | O_CLOEXEC));
    uint64_t n = 1 + Rand(4), first = Rand(kMaxBlocks - n);
    Prepare(id, first, n);
    return fd.ok() && PwriteFull(fd.get(), buf_, n * kBlock, static_cast<off_t>(first * kBlock)) == 0;
  }

  bool DsyncWrite() {
    if (!AnyFile()) return Create();
    uint64_t id = RandomFile();
    UniqueFd fd(open(Path(id).c_str(), O_WRONLY | O_DIRECT | O_DSYNC | O_CLOEXEC));
    uint64_t n = 1 + Rand(4), first = Rand(kMaxBlocks - n);
    Prepare(id, first, n);
    if (!fd.ok() || PwriteFull(fd.get(), buf_, n * kBlock, static_cast<off_t>(first * kBlock)) != 0) return false;
    for (uint64_t b = first; b < first + n; b++) {
      Log("P " + std::to_string(id) + " " + std::to_string(b) + " " + std::to_string(files_[id].written[b]));
    }
    return true;
  }

  bool FsyncFile(uint64_t id, bool datasync) {
    UniqueFd fd(open(Path(id).c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.ok() || (datasync ? fdatasync(fd.get()) : fsync(fd.get())) != 0) return false;
    Promise(id);
    return true;
  }

  // Not a durability point: Linux forwards syncfs(2) to FUSE servers only
  // for virtiofs, so on deferfs it promises nothing (README, durability).
  bool SyncFs() {
    UniqueFd fd(open(root_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    return fd.ok() && syncfs(fd.get()) == 0;
  }

  // The kernel forgets every unused inode and deferfs drops its copy: the
  // next open loads it from the store, knowing nothing of its last commits.
  // Twice a round at most: it drops the whole machine's dentries and inodes,
  // and the kernel logs each. Where /proc/sys is not writable, a no-op.
  bool ForgetInodes() {
    if (forgets_left_ > 0) {
      forgets_left_--;
      std::ofstream("/proc/sys/vm/drop_caches") << "2\n";
    }
    return true;
  }

  bool Truncate() {
    if (!AnyFile()) return Create();
    uint64_t id = RandomFile();
    uint64_t blocks = Rand(kMaxBlocks);
    Void(id, blocks, kMaxBlocks);
    auto& w = files_[id].written;
    w.erase(w.lower_bound(blocks), w.end());
    return truncate(Path(id).c_str(), static_cast<off_t>(blocks * kBlock)) == 0;
  }

  bool Punch() {
    if (!AnyFile()) return Create();
    uint64_t id = RandomFile();
    uint64_t n = 1 + Rand(8), first = Rand(kMaxBlocks - n);
    Void(id, first, first + n);
    auto& w = files_[id].written;
    w.erase(w.lower_bound(first), w.lower_bound(first + n));
    UniqueFd fd(open(Path(id).c_str(), O_WRONLY | O_CLOEXEC));
    return fd.ok() && fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                static_cast<off_t>(first * kBlock), static_cast<off_t>(n * kBlock)) == 0;
  }

  bool Fallocate() {
    if (!AnyFile()) return Create();
    uint64_t id = RandomFile();
    uint64_t n = 1 + Rand(16), first = Rand(kMaxBlocks - n);
    UniqueFd fd(open(Path(id).c_str(), O_WRONLY | O_CLOEXEC));
    return fd.ok() && fallocate(fd.get(), 0, static_cast<off_t>(first * kBlock), static_cast<off_t>(n * kBlock)) == 0;
  }

  bool Rename() {
    if (!AnyFile()) return Create();
    uint64_t id = RandomFile();
    std::string from = Path(id);
    files_[id].dir = files_[id].dir == kDirs[0] ? kDirs[1] : kDirs[0];
    return rename(from.c_str(), Path(id).c_str()) == 0;
  }

  bool Unlink() {
    if (files_.size() < 3) return Create();
    uint64_t id = RandomFile();
    Void(id, 0, kMaxBlocks);
    std::string p = Path(id);
    files_.erase(id);
    return unlink(p.c_str()) == 0;
  }

  // Keeps a file open across an unlink: its blocks stay live until close.
  bool Reopen() {
    if (!AnyFile()) return Create();
    uint64_t id = RandomFile();
    UniqueFd fd(open(Path(id).c_str(), O_RDWR | O_CLOEXEC));
    if (!fd.ok()) return false;
    Void(id, 0, kMaxBlocks);
    std::string p = Path(id);
    files_.erase(id);
    if (unlink(p.c_str()) != 0) return false;
    uint8_t b[kBlock];
    return pread(fd.get(), b, sizeof b, 0) >= 0;
  }

  std::string root_;
  int log_;
  std::mt19937_64 rng_;
  int forgets_left_ = 2;
  uint8_t* buf_ = nullptr;
  uint64_t version_ = 0;
  uint64_t next_id_ = 1;
  std::map<uint64_t, File> files_;
};

// ------------------------------------------------------------ the checker

struct Promises {
  std::map<std::pair<uint64_t, uint64_t>, uint64_t> kept;  // (file, block) -> version
  size_t made = 0;
};

Promises ReadLog(const std::string& path) {
  Promises p;
  std::ifstream in(path);
  std::string kind;
  uint64_t a, b, c;
  while (in >> kind >> a >> b >> c) {
    if (kind == "P") {
      p.kept[{a, b}] = c;
      p.made++;
    } else {
      for (uint64_t blk = b; blk < c; blk++) p.kept.erase({a, blk});
    }
  }
  return p;
}

// Checks every file under the workload's directories; adds what is wrong.
void CheckFiles(const std::string& root, const Promises& promises, std::vector<std::string>* errors) {
  std::map<uint64_t, std::vector<uint8_t>> contents;
  for (const char* d : kDirs) {
    std::string dir = root + "/" + d;
    RunResult ls = RunCommand({"ls", "-1", dir});
    if (!ls.succeeded()) continue;  // the directories may not have survived
    std::istringstream names(ls.out);
    for (std::string name; std::getline(names, name);) {
      uint64_t id = 0;
      if (name.size() < 2 || name[0] != 'f' || sscanf(name.c_str() + 1, "%" SCNu64, &id) != 1) {
        errors->push_back(dir + "/" + name + ": a name the workload never created");
        continue;
      }
      if (contents.count(id)) {
        errors->push_back(name + " exists in both directories");
        continue;
      }
      bool ok = false;
      contents[id] = ReadAllDirect(dir + "/" + name, &ok);
      if (!ok) errors->push_back(dir + "/" + name + ": unreadable");
    }
  }
  for (auto& [id, bytes] : contents) {
    if (bytes.size() % kBlock != 0) errors->push_back(FileName(id) + ": size " + std::to_string(bytes.size()) + " is not whole blocks");
    for (uint64_t blk = 0; blk * kBlock + kBlock <= bytes.size(); blk++) {
      std::string why;
      if (CheckBlock(bytes.data() + blk * kBlock, id, blk, &why) < 0) {
        errors->push_back(FileName(id) + " block " + std::to_string(blk) + " holds " + why);
      }
    }
  }
  for (auto [key, version] : promises.kept) {
    auto [id, blk] = key;
    auto it = contents.find(id);
    if (it == contents.end()) {
      errors->push_back(FileName(id) + " lost: block " + std::to_string(blk) + " version " + std::to_string(version) + " was made durable");
      continue;
    }
    std::string why;
    int64_t have = it->second.size() >= (blk + 1) * kBlock ? CheckBlock(it->second.data() + blk * kBlock, id, blk, &why) : 0;
    if (have >= 0 && static_cast<uint64_t>(have) < version) {
      errors->push_back(FileName(id) + " block " + std::to_string(blk) + ": version " + std::to_string(version) +
                        " was made durable, found " + (have == 0 ? std::string("zeros") : "version " + std::to_string(have)));
    }
  }
}

// ------------------------------------------------------------------ tests

class CrashTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CrashTest, SigkillAtRandomMomentsKeepsWhatWasPromised) {
  const uint64_t rounds = EnvOr("DEFERFS_CRASH_ROUNDS", 6);
  const uint64_t seed = EnvOr("DEFERFS_CRASH_SEED", std::random_device{}());
  SCOPED_TRACE("DEFERFS_CRASH_SEED=" + std::to_string(seed) + " (completion=" + GetParam() + ")");
  std::mt19937_64 rng(seed);

  TempDir tmp;
  const std::string backing = tmp / "backing.img";
  ASSERT_TRUE(MakePrefilledBacking(backing, 128ull << 20, kStale));
  const std::string log = tmp / "promises.log";
  uint64_t lost_bytes = 0;

  for (uint64_t round = 0; round < rounds; round++) {
    SCOPED_TRACE("round " + std::to_string(round));
    MountConfig cfg = MountConfig::Existing(backing);
    // Odd rounds commit in the background every second, so crashes also land
    // after (and during) background commits, not only before the first one.
    cfg.options = {"completion=" + GetParam(), "workers=2", round % 2 ? "commit=1" : "commit=5"};
    cfg.power_cut = true;
    // Every other pair of rounds, the metadata store keeps what reached its
    // filesystem unsynced: a record there ahead of its data's flush shows.
    cfg.metadata_written_back = (round / 2) % 2 == 1;
    MountedFs fs(cfg);
    ASSERT_TRUE(fs.ok());

    UniqueFd log_fd(open(log.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_APPEND | O_CLOEXEC, 0644));
    ASSERT_TRUE(log_fd.ok()) << strerror(errno);
    const uint64_t child_seed = rng();
    fflush(nullptr);
    pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      Workload(fs.root(), log_fd.get(), child_seed).Run();
      _exit(0);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(150 + rng() % 1500));
    ASSERT_TRUE(fs.Crash()) << fs.DaemonLog();
    lost_bytes += fs.lost_bytes();
    kill(child, SIGKILL);
    int status;
    waitpid(child, &status, 0);
    log_fd.reset();

    ASSERT_TRUE(fs.Mount()) << "the mount did not recover after the crash";
    Promises promises = ReadLog(log);
    std::vector<std::string> errors;
    CheckFiles(fs.root(), promises, &errors);
    for (size_t i = 0; i < errors.size() && i < 20; i++) ADD_FAILURE() << errors[i];
    ASSERT_TRUE(errors.empty()) << errors.size() << " problems; " << promises.made << " promises were made";

    // Clean the namespace for the next round (through the file system, so
    // the blocks come back), then check the store offline.
    for (const char* d : kDirs) RunCommand({"rm", "-rf", fs.path(d)});
    ASSERT_TRUE(fs.Unmount());
    RunResult fsck = RunDeferfs({"fsck", backing});
    ASSERT_TRUE(fsck.succeeded()) << "fsck after round " << round << ": " << fsck.Describe();
  }
  EXPECT_GT(lost_bytes, 0u) << "no power cut lost a write: the checks above had nothing to find";
}

// A mount whose background commit is far away (300 s), so that what a test
// finds durable after a crash was made durable by the call it checks, and
// whose crash is a power cut, so that data no flush covered is gone.
MountConfig CommitFarAway(std::vector<std::string> options) {
  MountConfig cfg;
  cfg.options = std::move(options);
  cfg.options.push_back("commit=300");
  cfg.power_cut = true;
  return cfg;
}

// Writes one block of `fill` at offset 0 through `fd` (O_DIRECT).
void PwriteBlock(int fd, char fill) {
  AlignedBuf buf(kBlock);
  std::memset(buf.data(), fill, kBlock);
  ASSERT_EQ(PwriteFull(fd, buf.data(), kBlock, 0), 0);
}

// Writes one block of `fill` at offset 0 of `path` (created) with O_DIRECT,
// then fsyncs if asked.
void WriteBlockDirect(const std::string& path, char fill, bool fsync_after) {
  UniqueFd fd(open(path.c_str(), O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  ASSERT_NO_FATAL_FAILURE(PwriteBlock(fd.get(), fill));
  if (fsync_after) {
    ASSERT_EQ(fsync(fd.get()), 0);
  }
}

// Expects `path` to be one block of `fill` (as WriteBlockDirect left it).
void ExpectOneBlockOf(const std::string& path, char fill) {
  std::vector<uint8_t> data = ReadAllDirect(path);
  ASSERT_EQ(data.size(), kBlock);
  EXPECT_EQ(data[100], fill);
}

// The crashes below are power cuts (undo_log=): an overwrite that nothing
// made durable is gone after one, so a missing flush cannot pass unseen.
TEST(PowerCutTest, AnOverwriteNoFlushCoveredIsLost) {
  MountedFs fs(CommitFarAway({"completion=defer"}));
  ASSERT_TRUE(fs.ok());
  const std::string path = fs.path("f");
  ASSERT_NO_FATAL_FAILURE(WriteBlockDirect(path, 'a', /*fsync_after=*/true));
  {
    UniqueFd fd(open(path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_NO_FATAL_FAILURE(PwriteBlock(fd.get(), 'b'));  // a pure overwrite: no flush owed
  }
  ASSERT_NO_FATAL_FAILURE(ExpectOneBlockOf(path, 'b'));
  ASSERT_TRUE(fs.Crash());
  EXPECT_GE(fs.lost_bytes(), kBlock);
  ASSERT_TRUE(fs.Mount());
  ExpectOneBlockOf(path, 'a');
}

// O_SYNC (unlike O_DSYNC) promises the timestamps too: a pure overwrite's
// new mtime must survive a crash that comes before any background commit.
TEST(CrashTimestampTest, OSyncOverwriteMakesItsMtimeDurable) {
  MountedFs fs(CommitFarAway({"completion=defer"}));
  ASSERT_TRUE(fs.ok());
  const std::string path = fs.path("f");
  ASSERT_NO_FATAL_FAILURE(WriteBlockDirect(path, 'a', /*fsync_after=*/true));
  struct stat before{}, after{}, recovered{};
  ASSERT_EQ(stat(path.c_str(), &before), 0);
  std::this_thread::sleep_for(20ms);  // so the overwrite's mtime differs
  {
    UniqueFd fd(open(path.c_str(), O_WRONLY | O_DIRECT | O_SYNC | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_NO_FATAL_FAILURE(PwriteBlock(fd.get(), 'b'));
    ASSERT_EQ(fstat(fd.get(), &after), 0);
  }
  ASSERT_NE(after.st_mtim.tv_nsec + after.st_mtim.tv_sec * 1'000'000'000LL,
            before.st_mtim.tv_nsec + before.st_mtim.tv_sec * 1'000'000'000LL);
  ASSERT_TRUE(fs.Crash());
  ASSERT_TRUE(fs.Mount());
  ASSERT_EQ(stat(path.c_str(), &recovered), 0);
  EXPECT_EQ(recovered.st_mtim.tv_sec, after.st_mtim.tv_sec);
  EXPECT_EQ(recovered.st_mtim.tv_nsec, after.st_mtim.tv_nsec);
  ExpectOneBlockOf(path, 'b');
}

// `dirsync`: every change to a directory is durable when the call returns,
// with no fsync and the background commit far away.
TEST(SyncMountTest, DirsyncMakesDirectoryChangesDurable) {
  MountedFs fs(CommitFarAway({"dirsync"}));
  ASSERT_TRUE(fs.ok());
  ASSERT_EQ(mkdir(fs.path("d").c_str(), 0755), 0);
  ASSERT_EQ(mkdir(fs.path("gone").c_str(), 0755), 0);
  {
    UniqueFd fd(open(fs.path("d/f").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
  }
  ASSERT_EQ(rename(fs.path("d/f").c_str(), fs.path("d/g").c_str()), 0);
  ASSERT_EQ(link(fs.path("d/g").c_str(), fs.path("h").c_str()), 0);
  ASSERT_EQ(symlink("d/g", fs.path("s").c_str()), 0);
  ASSERT_EQ(rmdir(fs.path("gone").c_str()), 0);
  ASSERT_TRUE(fs.Crash());
  ASSERT_TRUE(fs.Mount());
  struct stat st{};
  ASSERT_EQ(stat(fs.path("d/g").c_str(), &st), 0) << strerror(errno);
  EXPECT_EQ(st.st_nlink, 2u);
  EXPECT_EQ(Err(access(fs.path("d/f").c_str(), F_OK)), ENOENT);
  EXPECT_EQ(stat(fs.path("h").c_str(), &st), 0);
  char target[16] = {};
  EXPECT_EQ(readlink(fs.path("s").c_str(), target, sizeof(target) - 1), 3);
  EXPECT_STREQ(target, "d/g");
  EXPECT_EQ(Err(access(fs.path("gone").c_str(), F_OK)), ENOENT);
}

// `sync`: writes are O_DSYNC (the kernel does not say so for a direct_io
// file) and every change is durable on return: data, mode, xattr, names.
TEST(SyncMountTest, SyncMakesWritesAndChangesDurable) {
  MountedFs fs(CommitFarAway({"sync"}));
  ASSERT_TRUE(fs.ok());
  const std::string path = fs.path("f");
  ASSERT_NO_FATAL_FAILURE(WriteBlockDirect(path, 's', /*fsync_after=*/false));
  ASSERT_EQ(chmod(path.c_str(), 0600), 0);
  ASSERT_EQ(setxattr(path.c_str(), "user.k", "v", 1, 0), 0);
  ASSERT_TRUE(fs.Crash());
  ASSERT_TRUE(fs.Mount());
  struct stat st{};
  ASSERT_EQ(stat(path.c_str(), &st), 0) << strerror(errno);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  char v[4] = {};
  EXPECT_EQ(getxattr(path.c_str(), "user.k", v, sizeof(v)), 1);
  ExpectOneBlockOf(path, 's');
}

// `sync` means O_DSYNC, as the kernel's IS_SYNC does: an allocating write
// syncs its metadata before it returns; a pure overwrite goes write-through
// (FUA) and owes no WAL sync and no device flush. Its data survives a crash.
TEST(SyncMountTest, SyncOverwritesAreDatasync) {
  MountedFs fs(CommitFarAway({"sync", "completion=defer"}));
  ASSERT_TRUE(fs.ok());
  const std::string path = fs.path("f");
  UniqueFd fd(open(path.c_str(), O_CREAT | O_WRONLY | O_DIRECT | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  Stats s0 = Stats::Read(fs);
  ASSERT_NO_FATAL_FAILURE(PwriteBlock(fd.get(), 'a'));  // allocating
  Stats s1 = Stats::Read(fs);
  EXPECT_GE(s1.Since(s0, "metadata.wal_syncs"), 1u) << s1.raw();
  ASSERT_NO_FATAL_FAILURE(PwriteBlock(fd.get(), 'b'));  // pure overwrite
  Stats s2 = Stats::Read(fs);
  EXPECT_EQ(s2.Since(s1, "metadata.wal_syncs"), 0u) << "an overwrite owes no metadata: " << s2.raw();
  EXPECT_EQ(s2.Since(s1, "metadata.device_flushes"), 0u) << "FUA data owes no flush";
  fd.reset();
  ASSERT_TRUE(fs.Crash());
  ASSERT_TRUE(fs.Mount());
  ExpectOneBlockOf(path, 'b');
}

// The ordering as `deferfs stats` counts it: commits stay in memory until a
// durability point, which flushes the device once and then syncs the WAL;
// O_DSYNC data (FUA) is not flushed again; the commit interval syncs alone.
TEST(DurabilityPointTest, FlushesAndWalSyncsAreWhereTheyBelong) {
  MountedFs fs(CommitFarAway({"completion=defer"}));
  ASSERT_TRUE(fs.ok());
  AlignedBuf buf(16 * kBlock);
  std::memset(buf.data(), 'x', 16 * kBlock);

  UniqueFd fd(open(fs.path("a").c_str(), O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  Stats s0 = Stats::Read(fs);
  ASSERT_EQ(PwriteFull(fd.get(), buf.data(), 16 * kBlock, 0), 0);  // allocating
  Stats s1 = Stats::Read(fs);
  EXPECT_GE(s1.Since(s0, "metadata.commits"), 1u) << s1.raw();
  EXPECT_EQ(s1.Since(s0, "metadata.wal_syncs"), 0u) << "a plain write must not sync the WAL";
  EXPECT_EQ(s1.Since(s0, "metadata.device_flushes"), 0u);
  EXPECT_GE(s1["live.metadata_deferred"], 1u) << "the write's extent changes are held for the next sync";

  ASSERT_EQ(fsync(fd.get()), 0);
  Stats s2 = Stats::Read(fs);
  EXPECT_EQ(s2["live.metadata_deferred"], 0u) << "fsync lands them";
  EXPECT_EQ(s2.Since(s1, "metadata.wal_syncs"), 1u) << s2.raw();
  EXPECT_EQ(s2.Since(s1, "metadata.device_flushes"), 1u) << "one flush covers data and barrier";

  ASSERT_EQ(fsync(fd.get()), 0);  // nothing new: the device only
  Stats s3 = Stats::Read(fs);
  EXPECT_EQ(s3.Since(s2, "metadata.wal_syncs"), 0u) << s3.raw();
  EXPECT_EQ(s3.Since(s2, "metadata.device_flushes"), 1u);

  UniqueFd dsync(open(fs.path("a").c_str(), O_RDWR | O_DIRECT | O_DSYNC | O_CLOEXEC));
  ASSERT_TRUE(dsync.ok()) << strerror(errno);
  Stats s4 = Stats::Read(fs);
  ASSERT_EQ(PwriteFull(dsync.get(), buf.data(), 16 * kBlock, 16 * kBlock), 0);  // allocating, FUA
  Stats s5 = Stats::Read(fs);
  EXPECT_GE(s5.Since(s4, "metadata.wal_syncs"), 1u) << "O_DSYNC must sync its metadata: " << s5.raw();
  EXPECT_EQ(s5.Since(s4, "metadata.device_flushes"), 0u) << "FUA data owes no device flush";
}

// fdatasync owes what it takes to read the data back: after an allocating
// write, the WAL; after pure overwrites of a file whose commits are all
// durable, one device flush and no WAL sync (their new mtime can wait). The
// overwrite survives a crash.
TEST(DurabilityPointTest, FdatasyncSyncsTheWalOnlyWhenTheDataNeedsIt) {
  MountedFs fs(CommitFarAway({"completion=defer"}));
  ASSERT_TRUE(fs.ok());
  const std::string path = fs.path("f");
  UniqueFd fd(open(path.c_str(), O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  ASSERT_NO_FATAL_FAILURE(PwriteBlock(fd.get(), 'a'));  // allocating
  Stats s0 = Stats::Read(fs);
  ASSERT_EQ(fdatasync(fd.get()), 0);
  Stats s1 = Stats::Read(fs);
  EXPECT_EQ(s1.Since(s0, "metadata.wal_syncs"), 1u) << "the new extent: " << s1.raw();

  ASSERT_NO_FATAL_FAILURE(PwriteBlock(fd.get(), 'b'));  // pure overwrite
  Stats s2 = Stats::Read(fs);
  ASSERT_EQ(fdatasync(fd.get()), 0);
  Stats s3 = Stats::Read(fs);
  EXPECT_EQ(s3.Since(s2, "metadata.wal_syncs"), 0u) << "only the mtime changed: " << s3.raw();
  EXPECT_EQ(s3.Since(s2, "metadata.device_flushes"), 1u) << "the data is owed";
  fd.reset();
  ASSERT_TRUE(fs.Crash());
  ASSERT_TRUE(fs.Mount());
  ExpectOneBlockOf(path, 'b');
}

// A new file's existence is what an fdatasync of it owes, even with no data
// written (as ext4, whose fdatasync commits a new inode's transaction).
TEST(DurabilityPointTest, FdatasyncOfANewEmptyFileKeepsIt) {
  MountedFs fs(CommitFarAway({"completion=defer"}));
  ASSERT_TRUE(fs.ok());
  {
    UniqueFd fd(open(fs.path("new").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(fdatasync(fd.get()), 0);
  }
  ASSERT_TRUE(fs.Crash());
  ASSERT_TRUE(fs.Mount());
  EXPECT_EQ(access(fs.path("new").c_str(), F_OK), 0) << strerror(errno);
}

// fdatasync after each change that shapes what a read returns (size, holes,
// zeroed ranges, a read-modify-write) keeps it across a crash: each commits
// through CommitInode, so the file's meta_epoch sends fdatasync to the WAL.
// One crash per change, so a later fdatasync cannot cover an earlier one.
TEST(DurabilityPointTest, FdatasyncKeepsSizeHolesAndZeros) {
  struct Case {
    const char* what;
    std::function<int(int fd)> change;  // 0 or -1 with errno
    off_t size;                         // after it
    off_t probe;                        // a byte it decides
    uint8_t byte;                       // what that byte reads after it
  };
  const off_t b = static_cast<off_t>(kBlock);
  const Case cases[] = {
      {"truncate up", [&](int fd) { return ftruncate(fd, 3 * b); }, 3 * b, 2 * b + 5, 0},
      {"truncate down", [&](int fd) { return ftruncate(fd, b); }, b, 100, 'a'},
      {"fallocate past EOF", [&](int fd) { return fallocate(fd, 0, 0, 4 * b); }, 4 * b, 3 * b + 5, 0},
      {"punch", [&](int fd) { return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, b); }, 2 * b, 100, 0},
      {"zero range", [&](int fd) { return fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, b); }, 2 * b, 100, 0},
      {"unaligned write past EOF", [&](int fd) { return pwrite(fd, "cc", 2, 2 * b + 99) == 2 ? 0 : -1; }, 2 * b + 101,
       2 * b + 100, 'c'},
  };
  MountedFs fs(CommitFarAway({"completion=defer"}));
  ASSERT_TRUE(fs.ok());
  AlignedBuf two(2 * kBlock);
  std::memset(two.data(), 'a', 2 * kBlock);
  int n = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const std::string path = fs.path("c" + std::to_string(n++));
    {
      UniqueFd fd(open(path.c_str(), O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0644));
      ASSERT_TRUE(fd.ok()) << strerror(errno);
      ASSERT_EQ(PwriteFull(fd.get(), two.data(), 2 * kBlock, 0), 0);
      ASSERT_EQ(fsync(fd.get()), 0);
    }
    {
      UniqueFd fd(open(path.c_str(), O_RDWR | O_CLOEXEC));  // buffered: the unaligned write reaches us as is
      ASSERT_TRUE(fd.ok()) << strerror(errno);
      ASSERT_EQ(c.change(fd.get()), 0) << strerror(errno);
      ASSERT_EQ(fdatasync(fd.get()), 0);
    }
    ASSERT_TRUE(fs.Crash());
    ASSERT_TRUE(fs.Mount());
    struct stat st{};
    ASSERT_EQ(stat(path.c_str(), &st), 0) << strerror(errno);
    EXPECT_EQ(st.st_size, c.size);
    std::vector<uint8_t> data = ReadAllDirect(path);
    if (data.size() <= static_cast<size_t>(c.probe)) {
      ADD_FAILURE() << "read back " << data.size() << " bytes";
      continue;  // the other changes still get checked
    }
    EXPECT_EQ(data[0], c.probe < b ? c.byte : 'a');
    EXPECT_EQ(data[c.probe], c.byte);
  }
}

// An inode the kernel forgot (and deferfs dropped) may still have commits
// that are not durable: once it is loaded again, fdatasync must sync them,
// and an O_DSYNC overwrite must not settle for FUA alone.
TEST(DurabilityPointTest, DatasyncAfterTheInodeWasDroppedSyncsItsCommits) {
  if (access("/proc/sys/vm/drop_caches", W_OK) != 0) GTEST_SKIP() << "needs to make the kernel forget inodes (root)";
  MountedFs fs(CommitFarAway({"completion=defer"}));
  ASSERT_TRUE(fs.ok());
  for (bool dsync_write : {false, true}) {
    SCOPED_TRACE(dsync_write ? "O_DSYNC overwrite" : "fdatasync");
    const std::string path = fs.path(dsync_write ? "dsync" : "fdatasync");
    ASSERT_NO_FATAL_FAILURE(WriteBlockDirect(path, 'a', /*fsync_after=*/false));  // allocating
    // The kernel forgets the unused inode, and deferfs drops it (root only left).
    ASSERT_TRUE(WaitUntil(
        [&] {
          std::ofstream("/proc/sys/vm/drop_caches") << "2\n";
          return Stats::Read(fs)["live.inodes_cached"] == 1;
        },
        10s))
        << "the kernel did not forget the file";
    {
      UniqueFd fd(open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC | (dsync_write ? O_DSYNC : 0)));
      ASSERT_TRUE(fd.ok()) << strerror(errno);
      if (dsync_write) {
        ASSERT_NO_FATAL_FAILURE(PwriteBlock(fd.get(), 'b'));  // pure overwrite
      } else {
        ASSERT_EQ(fdatasync(fd.get()), 0);
      }
    }
    ASSERT_TRUE(fs.Crash());
    ASSERT_TRUE(fs.Mount());
    ASSERT_NO_FATAL_FAILURE(ExpectOneBlockOf(path, dsync_write ? 'b' : 'a'));
  }
}

// Changes to one file's inode and extents (an attribute, an unaligned
// write's size, a truncate, a fallocate) are held with the writes' extent
// changes rather than committed alone; fsync lands them, and they survive
// a crash. An unaligned append's new block and new size are one commit: as
// two, a WAL sync between them (another file's fsync, the commit interval)
// and a crash kept a written block past EOF, which a growth would show.
TEST(DurabilityPointTest, InodeOnlyChangesAreHeldUntilADurabilityPoint) {
  MountedFs fs(CommitFarAway({"completion=defer"}));
  ASSERT_TRUE(fs.ok());
  const std::string path = fs.path("f");
  ASSERT_NO_FATAL_FAILURE(WriteBlockDirect(path, 'a', /*fsync_after=*/true));
  UniqueFd fd(open(path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC));  // buffered: the append reaches us unaligned
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  const uint64_t held0 = Stats::Read(fs)["live.metadata_deferred"];
  ASSERT_EQ(fchmod(fd.get(), 0600), 0) << strerror(errno);
  const uint64_t held1 = Stats::Read(fs)["live.metadata_deferred"];
  EXPECT_GT(held1, held0) << "the chmod was committed alone";
  const uint64_t commits = Stats::Read(fs)["metadata.commits"];
  ASSERT_EQ(write(fd.get(), "tail", 4), 4) << strerror(errno);
  EXPECT_EQ(Stats::Read(fs)["metadata.commits"], commits + 1) << "the new block and the new size were committed apart";
  const uint64_t held2 = Stats::Read(fs)["live.metadata_deferred"];
  EXPECT_GT(held2, held1) << "the append was committed alone";
  ASSERT_EQ(fallocate(fd.get(), FALLOC_FL_KEEP_SIZE, 0, 4 * kBlock), 0) << strerror(errno);
  const uint64_t held3 = Stats::Read(fs)["live.metadata_deferred"];
  EXPECT_GT(held3, held2) << "the fallocate was committed alone";
  ASSERT_EQ(ftruncate(fd.get(), kBlock + 2), 0) << strerror(errno);
  EXPECT_GT(Stats::Read(fs)["live.metadata_deferred"], held3) << "the truncate was committed alone";
  ASSERT_EQ(fsync(fd.get()), 0);
  EXPECT_EQ(Stats::Read(fs)["live.metadata_deferred"], 0u) << "fsync lands them";
  fd.reset();
  ASSERT_TRUE(fs.Crash());
  ASSERT_TRUE(fs.Mount());
  struct stat st{};
  ASSERT_EQ(stat(path.c_str(), &st), 0) << strerror(errno);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(st.st_size, static_cast<off_t>(kBlock + 2));
  EXPECT_EQ(st.st_blocks, static_cast<blkcnt_t>(2 * kBlock / 512)) << "the truncate freed the preallocation";
}

// The zeros a growth writes past the old end of file (ZeroPastEof) are as
// durable as the growth: an O_DSYNC write beyond the end, all FUA, lets its
// commit skip the device flush, so zeros written without FUA could be lost
// in a power cut that kept the new size, and a failed write's bytes, which
// an earlier flush made durable, would show again past the old end.
TEST(DurabilityPointTest, ZerosPastTheOldEndAreAsDurableAsTheGrowth) {
  MountedFs fs(CommitFarAway({"completion=defer", "fault_inject"}));
  ASSERT_TRUE(fs.ok());
  const std::string path = fs.path("f");
  {
    UniqueFd fd(open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(pwrite(fd.get(), std::string(100, 'h').data(), 100, 0), 100);  // block 0 written, size 100
    ASSERT_EQ(fsync(fd.get()), 0);
  }
  {
    // Block 0's bio lands, block 1's fails: the write fails, the size stays.
    AlignedBuf bad(2 * kBlock);
    std::memset(bad.data(), 'X', bad.size());
    std::memcpy(bad.data() + kBlock, deferfs::kFaultEioWrite, sizeof(deferfs::kFaultEioWrite));
    UniqueFd fd(open(path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_LT(pwrite(fd.get(), bad.data(), bad.size(), 0), 0);
  }
  // A device flush (another file's fsync) makes the failed write's bytes durable.
  ASSERT_NO_FATAL_FAILURE(WriteBlockDirect(fs.path("other"), 'o', /*fsync_after=*/true));
  {
    AlignedBuf blk(kBlock);
    std::memset(blk.data(), 'd', kBlock);
    UniqueFd fd(open(path.c_str(), O_WRONLY | O_DIRECT | O_DSYNC | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(PwriteFull(fd.get(), blk.data(), kBlock, 2 * kBlock), 0);  // durable on return
  }
  ASSERT_TRUE(fs.Crash());
  ASSERT_TRUE(fs.Mount());
  struct stat st{};
  ASSERT_EQ(stat(path.c_str(), &st), 0) << strerror(errno);
  EXPECT_EQ(st.st_size, static_cast<off_t>(3 * kBlock)) << "the O_DSYNC write's size was lost";
  std::string block0(kBlock, '\0');
  UniqueFd rd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_EQ(pread(rd.get(), block0.data(), kBlock, 0), static_cast<ssize_t>(kBlock)) << strerror(errno);
  EXPECT_EQ(block0.substr(100), std::string(kBlock - 100, '\0')) << "the failed write's bytes are back past the old end";
}

TEST(DurabilityPointTest, TheCommitIntervalSyncsWithoutBeingAsked) {
  MountConfig cfg;
  cfg.options = {"completion=defer", "commit=1"};
  MountedFs fs(cfg);
  ASSERT_TRUE(fs.ok());
  AlignedBuf buf(kBlock);
  UniqueFd fd(open(fs.path("a").c_str(), O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd.ok()) << strerror(errno);
  const uint64_t before = Stats::Read(fs)["metadata.wal_syncs"];
  ASSERT_EQ(PwriteFull(fd.get(), buf.data(), kBlock, 0), 0);
  EXPECT_TRUE(WaitUntil([&] { return Stats::Read(fs)["metadata.wal_syncs"] > before; }, 30s))
      << "no background commit within 30 s of commit=1";
  EXPECT_GE(Stats::Read(fs)["metadata.device_flushes"], 1u) << "the commit went out without its barrier";
}

INSTANTIATE_TEST_SUITE_P(Modes, CrashTest, ::testing::ValuesIn(AllModes()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

}  // namespace
}  // namespace deferfs_test
