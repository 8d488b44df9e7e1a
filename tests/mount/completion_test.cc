// Completion modes on a real mount: after known workloads, `deferfs stats`
// shows that each mode runs completions where DESIGN.md says it does; the
// kernel's 6.6 self-deadlock (async writes in flight, then a drain from the
// same submitter) is reproduced in every mode and must not hang; the mount
// log and the stats report name the mode and thread counts; cpus= confines
// every daemon thread.
#include <fcntl.h>
#include <liburing.h>
#include <sched.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/io_helpers.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kBlock = 4096;

const std::vector<std::string> kPaths = {"completions.inline_poller", "completions.deferred_issuer",
                                         "completions.workqueue", "completions.sync_issuer"};

class CompletionTest : public ::testing::TestWithParam<MountVariant> {
 protected:
  void SetUp() override {
    if (const char* d = getenv("DEFERFS_TEST_DIR"); d != nullptr && *d != '\0') {
      GTEST_SKIP() << "completion modes need deferfs itself";
    }
    fs_.emplace(GetParam().Config());
    ASSERT_TRUE(fs_->ok()) << "mount failed";
  }
  void TearDown() override { fs_.reset(); }

  // A file of `size` bytes, fallocated: every block unwritten, so a first
  // write to it needs a conversion ("work") and a second one is a pure
  // overwrite.
  void MakeFallocated(const std::string& name, uint64_t size) {
    UniqueFd fd(open(fs_->path(name).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
    ASSERT_TRUE(fd.ok()) << strerror(errno);
    ASSERT_EQ(fallocate(fd.get(), 0, 0, static_cast<off_t>(size)), 0) << strerror(errno);
  }

  // fio 4k random IO, O_DIRECT through io_uring, on every block once.
  void Fio(const std::string& name, const std::string& rw, uint64_t size) {
    RunResult r = RunFio(rw, fs_->path(name),
                         {"--rw=" + rw, "--bs=4k", "--direct=1", "--ioengine=io_uring", "--iodepth=8",
                          "--size=" + std::to_string(size), "--randrepeat=1"});
    ASSERT_TRUE(FioSucceeded(r, *fs_));
  }

  // All `total` completions went to `path` (or were finished by the submitter
  // because nothing was left in flight), at least one really went there, and
  // no other path saw any.
  static void ExpectAllOn(const Stats& s, const std::string& path, uint64_t total, const char* phase) {
    SCOPED_TRACE(std::string(phase) + ": " + s.Summary());
    EXPECT_GT(s[path], 0u) << path;
    EXPECT_EQ(s[path] + s["completions.at_submit"], total) << path << " + at_submit";
    for (const auto& other : kPaths) {
      if (other != path) {
        EXPECT_EQ(s[other], 0u) << other;
      }
    }
    EXPECT_EQ(s["dio.errors"], 0u);
    EXPECT_EQ(s["dio_inflight"], 0u);
  }

  std::optional<MountedFs> fs_;
};

// Where each mode completes reads, pure overwrites, and writes needing work.
struct ModePaths {
  std::string read, overwrite, work;
};

ModePaths PathsOf(const std::string& mode) {
  const std::string inl = "completions.inline_poller", wq = "completions.workqueue",
                    def = "completions.deferred_issuer", sync = "completions.sync_issuer";
  if (mode == "inline") return {inl, inl, inl};
  if (mode == "workqueue") return {inl, wq, wq};
  if (mode == "defer") return {inl, def, def};
  if (mode == "auto") return {inl, inl, def};
  return {sync, sync, sync};
}

TEST_P(CompletionTest, StatsShowThePathsOfTheMode) {
  const MountVariant& v = GetParam();
  const ModePaths want = PathsOf(v.mode);
  constexpr uint64_t kSize = 8 * kMiB;
  constexpr uint64_t kOps = kSize / kBlock;
  ASSERT_NO_FATAL_FAILURE(MakeFallocated("f", kSize));
  Stats::Read(*fs_, /*reset=*/true);

  // 1: every write converts an unwritten block.
  ASSERT_NO_FATAL_FAILURE(Fio("f", "randwrite", kSize));
  Stats s = Stats::Read(*fs_, true);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s.text("mode"), v.mode);
  EXPECT_EQ(s["dio.writes"], kOps) << s.Summary();
  EXPECT_EQ(s["dio.reads"], 0u) << s.Summary();
  EXPECT_EQ(s["dio.pure_overwrites"], 0u) << s.Summary();
  ExpectAllOn(s, want.work, kOps, "conversions");
  if (want.work == "completions.deferred_issuer") {
    EXPECT_EQ(s["workers.task_work_run"], s["completions.deferred_issuer"]) << "deferred completions run by task_work";
  } else {
    EXPECT_EQ(s["workers.task_work_run"], 0u);
  }

  // 2: the same blocks again: pure overwrites.
  ASSERT_NO_FATAL_FAILURE(Fio("f", "randwrite", kSize));
  s = Stats::Read(*fs_, true);
  EXPECT_EQ(s["dio.writes"], kOps) << s.Summary();
  EXPECT_EQ(s["dio.pure_overwrites"], kOps) << s.Summary();
  ExpectAllOn(s, want.overwrite, kOps, "pure overwrites");

  // 3: reads never need work: the poller completes them in every async mode.
  ASSERT_NO_FATAL_FAILURE(Fio("f", "randread", kSize));
  s = Stats::Read(*fs_, true);
  EXPECT_EQ(s["dio.reads"], kOps) << s.Summary();
  EXPECT_EQ(s["dio.writes"], 0u) << s.Summary();
  ExpectAllOn(s, want.read, kOps, "reads");

  // 4: the counters were reset by the last read: nothing since.
  s = Stats::Read(*fs_);
  EXPECT_EQ(s.completions(), 0u) << s.Summary();
}

TEST_P(CompletionTest, LogAndStatsNameTheModeAndThreads) {
  const MountVariant& v = GetParam();
  // The mount log: "completion=MODE,workers=N,pollers=M,cthreads=K". With
  // -f the line follows the mount becoming visible: wait for it (bounded).
  WaitUntil([&] { return fs_->DaemonLog().find("mounted") != std::string::npos; }, 10s);
  EXPECT_NE(fs_->DaemonLog().find(v.Describe()), std::string::npos)
      << "want \"" << v.Describe() << "\" in the mount log:\n"
      << fs_->DaemonLog();

  Stats s = Stats::Read(*fs_);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s.text("mode"), v.mode);
  EXPECT_EQ(s["threads.workers"], static_cast<uint64_t>(v.workers));
  EXPECT_EQ(s["threads.pollers"], static_cast<uint64_t>(v.pollers));
  EXPECT_EQ(s["threads.cthreads"], static_cast<uint64_t>(v.cthreads));

  RunResult table = RunDeferfs({"stats", fs_->root()});
  ASSERT_TRUE(table.succeeded()) << table.Describe();
  for (const auto& [key, value] : std::vector<std::pair<std::string, std::string>>{
           {"mode", v.mode},
           {"threads.workers", std::to_string(v.workers)},
           {"threads.pollers", std::to_string(v.pollers)},
           {"threads.cthreads", std::to_string(v.cthreads)}}) {
    std::regex line("(^|\n)" + key + " +" + value + "\n");
    EXPECT_TRUE(std::regex_search(table.out, line)) << "want a \"" << key << " " << value << "\" row in:\n"
                                                    << table.out;
  }
}

// ------------------------------------------------ the kernel's 6.6 hang

constexpr int kDepth = 32;
constexpr int kRounds = 50;
constexpr uint64_t kHangFile = 4 * kMiB;

// The workload, run in a forked child: one submitter keeps kDepth async
// O_DIRECT writes in flight and, before reaping them, asks for the drains
// that wait for in-flight DIO (punch, truncate, unaligned write). In Linux
// 6.6 with IOCB_DIO_CALLER_COMP the issuer's own task_work held those
// completions: a deadlock. Returns "" or what went wrong.
std::string DrainWhileInFlight(const std::string& path, uint64_t seed) {
  UniqueFd dfd(open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC));
  UniqueFd bfd(open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!dfd.ok() || !bfd.ok()) return std::string("open: ") + strerror(errno);
  io_uring ring;
  if (int e = io_uring_queue_init(kDepth, &ring, 0); e < 0) return std::string("io_uring_queue_init: ") + strerror(-e);
  struct RingCloser {
    io_uring* r;
    ~RingCloser() { io_uring_queue_exit(r); }
  } closer{&ring};
  AlignedBuf bufs(kDepth * kBlock);
  std::mt19937_64 rng(seed);
  std::memset(bufs.data(), 0xE7, bufs.size());
  auto block = [&] { return static_cast<off_t>(rng() % (kHangFile / kBlock) * kBlock); };

  int in_flight_rounds = 0;  // rounds whose drains really overlapped writes
  for (int round = 0; round < kRounds; round++) {
    std::ostringstream where;
    where << "round " << round << ": ";
    // Every other round starts from unwritten blocks: writes needing work.
    if (round % 2 == 0 && fallocate(dfd.get(), 0, 0, kHangFile) != 0) {
      return where.str() + "fallocate: " + strerror(errno);
    }
    for (int i = 0; i < kDepth; i++) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring);
      if (sqe == nullptr) return where.str() + "no sqe";
      io_uring_prep_write(sqe, dfd.get(), bufs.data() + i * kBlock, kBlock, block());
      io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(i));
    }
    if (int n = io_uring_submit(&ring); n != kDepth) {
      return where.str() + "io_uring_submit returned " + std::to_string(n);
    }
    // The drains, from the submitter, with its writes still in flight.
    if (io_uring_cq_ready(&ring) < static_cast<unsigned>(kDepth)) in_flight_rounds++;
    const off_t punch = block();
    if (fallocate(dfd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, punch, 64 * 1024) != 0) {
      return where.str() + "punch: " + strerror(errno);
    }
    if (ftruncate(dfd.get(), static_cast<off_t>(kHangFile)) != 0) return where.str() + "ftruncate: " + strerror(errno);
    char odd[100];
    std::memset(odd, 'u', sizeof odd);
    if (PwriteFull(bfd.get(), odd, sizeof odd, block() + 1000) != 0) {
      return where.str() + "unaligned pwrite: " + strerror(errno);
    }
    for (int i = 0; i < kDepth; i++) {
      io_uring_cqe* cqe = nullptr;
      if (int e = io_uring_wait_cqe(&ring, &cqe); e < 0) return where.str() + "wait_cqe: " + strerror(-e);
      const int res = cqe->res;
      io_uring_cqe_seen(&ring, cqe);
      if (res != static_cast<int>(kBlock)) {
        return where.str() + "write completed with " + std::to_string(res) +
               (res < 0 ? std::string(" (") + strerror(-res) + ")" : "");
      }
    }
  }
  if (fsync(dfd.get()) != 0) return std::string("fsync: ") + strerror(errno);
  if (in_flight_rounds < kRounds / 2) {
    return "writes were in flight at the drains in only " + std::to_string(in_flight_rounds) + " of " +
           std::to_string(kRounds) + " rounds: the workload does not reproduce the scenario";
  }
  return "";
}

TEST_P(CompletionTest, DrainsWithWritesInFlightDoNotHang) {
  ASSERT_NO_FATAL_FAILURE(MakeFallocated("hang", kHangFile));
  const std::string path = fs_->path("hang");
  ChildOutcome out = RunWithDeadline([&] { return DrainWhileInFlight(path, 42); }, 120s, fs_->daemon_pid());
  ASSERT_FALSE(out.timed_out) << "the workload hung (" << out.message
                              << "): a drain waited for completions nobody runs. Daemon log:\n"
                              << fs_->DaemonLog();
  ASSERT_TRUE(out.exited_ok) << out.message << "\ndaemon log:\n" << fs_->DaemonLog();

  // Everything completed, without errors, and the file system still serves.
  Stats s = Stats::Read(*fs_);
  EXPECT_EQ(s["dio_inflight"], 0u) << s.Summary();
  EXPECT_EQ(s["dio.errors"], 0u) << s.Summary();
  EXPECT_EQ(s.completions(), s["dio.reads"] + s["dio.writes"]) << s.Summary();
  EXPECT_GE(s["dio.writes"], static_cast<uint64_t>(kDepth * kRounds)) << s.Summary();
  if (GetParam().mode == "defer") {
    EXPECT_GT(s["completions.deferred_issuer"], 0u) << "the deadlock-prone path was not exercised: " << s.Summary();
  }
  struct stat st{};
  ASSERT_EQ(stat(path.c_str(), &st), 0) << strerror(errno);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kHangFile);
  ASSERT_TRUE(fs_->Remount());
  ASSERT_EQ(stat(path.c_str(), &st), 0) << strerror(errno);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kHangFile);
}

INSTANTIATE_TEST_SUITE_P(Modes, CompletionTest, ::testing::ValuesIn(EveryMode(2, 1, 1)), VariantName());
// Each thread of the daemon: name -> its Cpus_allowed_list.
std::vector<std::pair<std::string, std::string>> ThreadCpus(pid_t pid) {
  std::vector<std::pair<std::string, std::string>> out;
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  for (const auto& t : std::filesystem::directory_iterator(dir)) {
    std::ifstream status(t.path() / "status");
    std::string line, name, cpus;
    while (std::getline(status, line)) {
      if (line.starts_with("Name:\t")) name = line.substr(6);
      if (line.starts_with("Cpus_allowed_list:\t")) cpus = line.substr(19);
    }
    out.emplace_back(name, cpus);
  }
  return out;
}

// cpus= confines every daemon thread, the ones started after the mount
// (workers, pollers, the completion thread, RocksDB's) included, and IO works.
// io_uring's kernel workers (iou-wrk) follow the cpuset, not the daemon.
// The default worker count follows the CPUs left.
TEST(CpusOptionTest, EveryDaemonThreadRunsOnTheChosenCpus) {
  if (const char* d = getenv("DEFERFS_TEST_DIR"); d != nullptr && *d != '\0') GTEST_SKIP() << "needs deferfs itself";
  cpu_set_t allowed;
  ASSERT_EQ(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
  int last = -1;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &allowed)) last = c;
  }
  if (CPU_COUNT(&allowed) < 2) GTEST_SKIP() << "needs two CPUs to tell a confined daemon from a free one";
  const std::string cpu = std::to_string(last);
  for (const bool confined : {true, false}) {
    SCOPED_TRACE(confined ? "cpus=" + cpu : "no cpus=");
    MountConfig cfg;
    // Confined, workers= is left to its default, which counts the CPUs
    // cpus= leaves: one, so one worker.
    cfg.options = {"completion=workqueue", confined ? "cpus=" + cpu : "workers=2"};
    MountedFs fs(cfg);
    ASSERT_TRUE(fs.ok());
    RunResult r = RunFio("rw", fs.path("f"), {"--rw=randrw", "--bs=4k", "--direct=1", "--ioengine=io_uring",
                                              "--iodepth=8", "--size=4m", "--verify=crc32c"});
    ASSERT_TRUE(FioSucceeded(r, fs));
    const auto threads = ThreadCpus(fs.daemon_pid());
    std::set<std::string> names;
    for (const auto& [name, cpus] : threads) {
      names.insert(name);
      if (name.starts_with("iou-")) continue;
      if (confined) {
        EXPECT_EQ(cpus, cpu) << name;
      } else {
        EXPECT_NE(cpus, cpu) << name;
      }
    }
    for (const char* want : {"deferfs-worker", "deferfs-poller", "deferfs-cthread", "deferfs-meta"}) {
      EXPECT_TRUE(names.count(want)) << want;
    }
    const auto workers = std::count_if(threads.begin(), threads.end(), [](const auto& t) { return t.first == "deferfs-worker"; });
    EXPECT_EQ(workers, confined ? 1 : 2);
    EXPECT_TRUE(fs.Unmount());
  }
}

INSTANTIATE_TEST_SUITE_P(OneOfEach, CompletionTest, ::testing::ValuesIn(EveryMode(1, 1, 1)), VariantName());
INSTANTIATE_TEST_SUITE_P(Wide, CompletionTest, ::testing::ValuesIn(EveryMode(4, 2, 2)), VariantName());

}  // namespace
}  // namespace deferfs_test
