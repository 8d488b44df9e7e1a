// The daemon under load, in every completion mode: 64 concurrent fio jobs
// (O_DIRECT; io_uring writes that verify themselves, libaio mixed reads and
// writes), a process creating and unlinking thousands of files, and
// applications SIGKILLed while their O_DIRECT io_uring IO is in flight, all
// at once. Afterwards the live gauges of `deferfs stats` return to idle (no
// request, buffer or file handle leaked), the daemon still answers, and data
// written before and under the load reads back, also after a remount.
#include <dirent.h>
#include <fcntl.h>
#include <liburing.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/io_helpers.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using namespace std::chrono_literals;

constexpr int kWorkers = 4;
constexpr int kFioJobs = 64;
constexpr int kChurnFiles = 3000;
constexpr int kKilledApps = 3;

// ------------------------------------------------------------- workloads

// Creates, writes and unlinks kChurnFiles files in `dir` (every third one
// unlinked while still open and used afterwards), with a mkdir/rmdir now and
// then; the directory must end empty. "" or what went wrong.
std::string Churn(const std::string& dir) {
  if (mkdir(dir.c_str(), 0755) != 0) return "mkdir " + dir + ": " + strerror(errno);
  char data[512];
  std::memset(data, 'c', sizeof data);
  for (int i = 0; i < kChurnFiles; i++) {
    const std::string p = dir + "/n" + std::to_string(i);
    UniqueFd fd(open(p.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644));
    if (!fd.ok()) return "create " + p + ": " + strerror(errno);
    if (write(fd.get(), data, sizeof data) != static_cast<ssize_t>(sizeof data)) return "write " + p + ": " + strerror(errno);
    if (i % 3 == 0) {
      if (unlink(p.c_str()) != 0) return "unlink (open) " + p + ": " + strerror(errno);
      char back[sizeof data];
      if (pread(fd.get(), back, sizeof back, 0) != static_cast<ssize_t>(sizeof back) ||
          std::memcmp(back, data, sizeof data) != 0) {
        return "read back of unlinked open " + p + " failed";
      }
      fd.reset();
    } else {
      fd.reset();
      if (unlink(p.c_str()) != 0) return "unlink " + p + ": " + strerror(errno);
    }
    if (i % 100 == 0) {
      const std::string d = dir + "/d" + std::to_string(i);
      if (mkdir(d.c_str(), 0755) != 0 || rmdir(d.c_str()) != 0) return "mkdir/rmdir " + d + ": " + strerror(errno);
    }
  }
  DIR* dp = opendir(dir.c_str());
  if (dp == nullptr) return "opendir " + dir + ": " + strerror(errno);
  std::string left;
  while (dirent* e = readdir(dp)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) left += std::string(" ") + e->d_name;
  }
  closedir(dp);
  return left.empty() ? "" : "entries left after churn:" + left;
}

// An application that keeps kDepth O_DIRECT reads and writes in flight on
// `path` through io_uring until it is killed; each completion bumps
// *progress (shared memory) so the parent can kill it mid-IO. Never returns.
[[noreturn]] void UringApp(const std::string& path, std::atomic<uint64_t>* progress) {
  constexpr unsigned kDepth = 32;
  constexpr size_t kBlock = 64 << 10;
  constexpr uint64_t kSpan = 16ull << 20;
  int fd = open(path.c_str(), O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0644);
  io_uring ring;
  if (fd < 0 || io_uring_queue_init(kDepth, &ring, 0) != 0) _exit(2);
  std::vector<AlignedBuf> bufs;
  for (unsigned i = 0; i < kDepth; i++) bufs.emplace_back(kBlock);
  std::mt19937_64 rng(getpid());
  auto submit = [&](unsigned slot) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    if (sqe == nullptr) _exit(3);
    const size_t len = 4096 * (1 + rng() % (kBlock / 4096));
    const off_t off = static_cast<off_t>((rng() % (kSpan / 4096)) * 4096);
    if (rng() % 2) io_uring_prep_write(sqe, fd, bufs[slot].data(), len, off);
    else io_uring_prep_read(sqe, fd, bufs[slot].data(), len, off);
    io_uring_sqe_set_data64(sqe, slot);
  };
  for (unsigned i = 0; i < kDepth; i++) submit(i);
  for (;;) {
    if (io_uring_submit(&ring) < 0) _exit(4);
    io_uring_cqe* cqe;
    if (io_uring_wait_cqe(&ring, &cqe) != 0) _exit(5);
    if (cqe->res < 0) _exit(6);
    const unsigned slot = static_cast<unsigned>(io_uring_cqe_get_data64(cqe));
    io_uring_cqe_seen(&ring, cqe);
    progress->fetch_add(1, std::memory_order_relaxed);
    submit(slot);
  }
}

// Runs kKilledApps UringApps one after another, each SIGKILLed once it has
// completed some IO (so more is in flight). "" or what went wrong.
std::string KillAppsMidIo(const std::string& dir) {
  void* shm = mmap(nullptr, sizeof(std::atomic<uint64_t>), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (shm == MAP_FAILED) return std::string("mmap: ") + strerror(errno);
  auto* progress = std::construct_at(static_cast<std::atomic<uint64_t>*>(shm), 0);
  std::string err;
  for (int i = 0; i < kKilledApps && err.empty(); i++) {
    progress->store(0);
    const std::string path = dir + "/app" + std::to_string(i);
    fflush(nullptr);
    pid_t pid = fork();
    if (pid < 0) {
      err = std::string("fork: ") + strerror(errno);
      break;
    }
    if (pid == 0) UringApp(path, progress);
    int status = 0;
    bool died_early = false;
    WaitUntil(
        [&] {
          if (waitpid(pid, &status, WNOHANG) == pid) died_early = true;
          return died_early || progress->load() >= 200;
        },
        120s);
    if (died_early) {
      err = "io_uring app " + std::to_string(i) + " ended before it was killed (status " + std::to_string(status) + ")";
      break;
    }
    if (progress->load() < 200) err = "io_uring app " + std::to_string(i) + " made no progress in 120 s";
    kill(pid, SIGKILL);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (err.empty() && !(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)) {
      err = "io_uring app " + std::to_string(i) + " was not ended by SIGKILL (status " + std::to_string(status) + ")";
    }
  }
  munmap(shm, sizeof(std::atomic<uint64_t>));
  return err;
}

// 64 fio jobs on their own small files: half io_uring random writes that
// verify what they wrote, half libaio mixed random reads and writes.
std::vector<std::string> FioArgs(const std::string& dir) {
  const std::string half = std::to_string(kFioJobs / 2);
  return {"fio", "--output-format=normal", "--directory=" + dir, "--direct=1", "--bs=4k", "--size=2M",
          "--iodepth=8", "--randrepeat=1", "--group_reporting",
          // verified writes
          "--name=w", "--numjobs=" + half, "--ioengine=io_uring", "--rw=randwrite", "--verify=crc32c",
          "--verify_fatal=1", "--verify_state_save=0", "--do_verify=1",
          // mixed reads and writes for a fixed time
          "--name=rw", "--numjobs=" + half, "--ioengine=libaio", "--rw=randrw", "--rwmixread=50",
          "--time_based", "--runtime=4"};
}

// -------------------------------------------------------------- fixture

class LoadTest : public ::testing::TestWithParam<MountVariant> {
 protected:
  void SetUp() override {
    if (const char* d = getenv("DEFERFS_TEST_DIR"); d != nullptr && *d != '\0') {
      GTEST_SKIP() << "load test reads deferfs' own gauges";
    }
    fs_.emplace(GetParam().Config(1ull << 30));
    ASSERT_TRUE(fs_->ok()) << "mount failed";
  }
  void TearDown() override { fs_.reset(); }

  std::optional<MountedFs> fs_;
};

// ------------------------------------------------------------------ tests

TEST_P(LoadTest, GaugesReturnToIdleAfterLoadAndKilledApps) {
  MountedFs& fs = *fs_;
  // Idle before anything ran: the baseline the load must return to.
  ASSERT_TRUE(BecomesIdle(fs, kWorkers));

  // Data written before the load; must survive it unchanged.
  std::mt19937_64 rng(7);
  const std::vector<uint8_t> before = RandomBytes(rng, 4 << 20);
  ASSERT_TRUE(WriteAllDirect(fs.path("before"), before));
  ASSERT_EQ(mkdir(fs.path("fio").c_str(), 0755), 0);
  ASSERT_EQ(mkdir(fs.path("apps").c_str(), 0755), 0);

  // The children first, while this is the only thread (see Child).
  Child churn_child([&] { return Churn(fs.path("churn")); });
  Child apps_child([&] { return KillAppsMidIo(fs.path("apps")); });
  RunResult fio;
  std::thread fio_thread([&] { fio = RunCommand(FioArgs(fs.path("fio")), 600s); });
  const ChildOutcome churn = churn_child.Wait(600s, fs.daemon_pid());
  const ChildOutcome apps = apps_child.Wait(600s, fs.daemon_pid());
  fio_thread.join();

  EXPECT_TRUE(FioSucceeded(fio, fs));
  EXPECT_EQ(fio.out.find("verify: bad"), std::string::npos) << fio.out;
  EXPECT_TRUE(churn.exited_ok) << "churn: " << churn.message;
  EXPECT_TRUE(apps.exited_ok) << "killed apps: " << apps.message;

  // Every request answered, every buffer back, every file released.
  EXPECT_TRUE(BecomesIdle(fs, kWorkers));
  Stats s = Stats::Read(fs);
  EXPECT_EQ(s["dio.errors"], 0u) << s.raw();
  EXPECT_GT(s["dio.writes"], 0u);

  // The daemon still answers, and the data is intact.
  struct stat st{};
  ASSERT_EQ(stat(fs.path("").c_str(), &st), 0) << strerror(errno);
  EXPECT_TRUE(SameBytes(before, ReadAllDirect(fs.path("before"))));
  const std::vector<uint8_t> after = RandomBytes(rng, 1 << 20);
  ASSERT_TRUE(WriteAllDirect(fs.path("after"), after));
  EXPECT_TRUE(SameBytes(after, ReadAllDirect(fs.path("after"))));
  for (int i = 0; i < kKilledApps; i++) {
    EXPECT_EQ(stat(fs.path("apps/app" + std::to_string(i)).c_str(), &st), 0) << "app" << i;
  }

  // And after a remount: the files the load left behind are consistent.
  ASSERT_TRUE(fs.Remount());
  EXPECT_TRUE(SameBytes(before, ReadAllDirect(fs.path("before"))));
  EXPECT_TRUE(SameBytes(after, ReadAllDirect(fs.path("after"))));
  DIR* dp = opendir(fs.path("churn").c_str());
  ASSERT_NE(dp, nullptr) << strerror(errno);
  int entries = 0;
  while (dirent* e = readdir(dp)) entries += std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0;
  closedir(dp);
  EXPECT_EQ(entries, 0);
  EXPECT_TRUE(BecomesIdle(fs, kWorkers));
}

INSTANTIATE_TEST_SUITE_P(Modes, LoadTest, ::testing::ValuesIn(EveryMode(kWorkers, 2, 2)), VariantName());

}  // namespace
}  // namespace deferfs_test
