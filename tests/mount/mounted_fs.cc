#include "tests/mount/mounted_fs.h"

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>

#include "backend/undo_log.h"

namespace deferfs_test {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr auto kMountDeadline = 20s;
constexpr auto kExitDeadline = 20s;

std::string ReadFd(int fd) {
  std::string s;
  char buf[4096];
  for (off_t off = 0;;) {
    ssize_t n = pread(fd, buf, sizeof buf, off);
    if (n <= 0) break;
    s.append(buf, n);
    off += n;
  }
  return s;
}

std::string Dirname(const std::string& p) {
  auto parent = std::filesystem::path(p).parent_path().string();
  return parent.empty() ? "." : parent;
}

// Waits for `pid` until the deadline; true (and *status) if it was reaped.
bool WaitFor(pid_t pid, Clock::duration timeout, int* status) {
  auto deadline = Clock::now() + timeout;
  auto nap = 1ms;
  for (;;) {
    pid_t r = waitpid(pid, status, WNOHANG);
    if (r == pid) return true;
    if (r < 0 && errno != EINTR) return false;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(nap);
    nap = std::min<std::chrono::milliseconds>(nap * 2, 20ms);
  }
}

std::string DescribeStatus(int status) {
  std::ostringstream os;
  if (WIFEXITED(status)) {
    os << "exit " << WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    os << "killed by signal " << WTERMSIG(status) << " (" << strsignal(WTERMSIG(status)) << ")";
  } else {
    os << "status " << status;
  }
  return os.str();
}

std::vector<char*> Argv(const std::vector<std::string>& args) {
  std::vector<char*> v;
  for (const auto& a : args) v.push_back(const_cast<char*>(a.c_str()));
  v.push_back(nullptr);
  return v;
}

std::string Tail(const std::string& s, size_t n = 4000) {
  return s.size() <= n ? s : "..." + s.substr(s.size() - n);
}

}  // namespace

bool RunResult::exited() const { return !timed_out && WIFEXITED(status); }
int RunResult::exit_code() const { return exited() ? WEXITSTATUS(status) : -1; }

std::string RunResult::Describe() const {
  std::ostringstream os;
  os << (timed_out ? "timed out (killed)" : DescribeStatus(status)) << "; stdout=[" << Tail(out)
     << "] stderr=[" << Tail(err) << "]";
  return os.str();
}

RunResult RunCommand(const std::vector<std::string>& argv, std::chrono::milliseconds timeout) {
  RunResult res;
  UniqueFd out(memfd_create("stdout", MFD_CLOEXEC));
  UniqueFd err(memfd_create("stderr", MFD_CLOEXEC));
  if (!out.ok() || !err.ok() || argv.empty()) {
    res.err = std::string("RunCommand: memfd_create: ") + strerror(errno);
    return res;
  }
  auto args = Argv(argv);  // built before fork: the child only calls async-signal-safe functions
  pid_t pid = fork();
  if (pid < 0) {
    res.err = std::string("RunCommand: fork: ") + strerror(errno);
    return res;
  }
  if (pid == 0) {
    int null = open("/dev/null", O_RDONLY);
    if (null < 0 || dup2(null, 0) < 0 || dup2(out.get(), 1) < 0 || dup2(err.get(), 2) < 0) _exit(126);
    execvp(args[0], args.data());
    constexpr char kMsg[] = "RunCommand: exec failed (binary missing or being rebuilt?)\n";
    if (write(2, kMsg, sizeof kMsg - 1) < 0) _exit(127);
    _exit(127);
  }
  if (!WaitFor(pid, timeout, &res.status)) {
    res.timed_out = true;
    kill(pid, SIGKILL);
    waitpid(pid, &res.status, 0);
  }
  res.out = ReadFd(out.get());
  res.err = ReadFd(err.get());
  return res;
}

RunResult RunDeferfs(const std::vector<std::string>& args, std::chrono::milliseconds timeout) {
  std::vector<std::string> argv{DEFERFS_BIN};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCommand(argv, timeout);
}

int RunAs(uid_t uid, gid_t gid, const std::function<int()>& fn) {
  pid_t pid = fork();
  if (pid < 0) return 255;
  if (pid == 0) {
    if (setgroups(0, nullptr) != 0 || setgid(gid) != 0 || setuid(uid) != 0) _exit(254);
    _exit(fn() & 0xff);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 255;
}

bool IsLiveMount(const std::string& path) {
  struct stat st{}, parent{};
  return stat(path.c_str(), &st) == 0 && stat(Dirname(path).c_str(), &parent) == 0 &&
         st.st_dev != parent.st_dev;
}

bool IsMounted(const std::string& path) {
  struct stat st{}, parent{};
  if (stat(path.c_str(), &st) != 0) return errno == ENOTCONN;  // a FUSE mount whose daemon died
  return stat(Dirname(path).c_str(), &parent) == 0 && st.st_dev != parent.st_dev;
}

int TryFlock(const std::string& path) {
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.ok()) return errno;
  return Err(flock(fd.get(), LOCK_EX | LOCK_NB));
}

bool WaitUntil(const std::function<bool()>& cond, std::chrono::milliseconds timeout) {
  for (auto deadline = Clock::now() + timeout; !cond();) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

std::string MakeTempDir(const std::string& parent, std::string_view prefix) {
  std::string tmpl = parent + "/" + std::string(prefix) + "-XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp " << tmpl << ": " << strerror(errno);
    return "";
  }
  // 0755 so that RunAs users can reach files below it.
  chmod(tmpl.c_str(), 0755);
  return tmpl;
}

// Removes `dir` recursively unless something is mounted in it (removing
// through a live mount would destroy what a failing test wants to show, and a
// dead one cannot be removed anyway).
static void RemoveTree(const std::string& dir) {
  if (dir.empty()) return;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_directory(ec) && !it->is_symlink(ec) && IsMounted(it->path().string())) {
      ADD_FAILURE() << "not removing " << dir << ": " << it->path() << " is still mounted";
      return;
    }
  }
  std::filesystem::remove_all(dir, ec);
  if (ec) ADD_FAILURE() << "remove_all " << dir << ": " << ec.message();
}

TempDir::TempDir(const std::string& parent, std::string_view prefix)
    : path_(MakeTempDir(parent, prefix)) {}

TempDir::~TempDir() { RemoveTree(path_); }

// ---------------------------------------------------------------- MountedFs

MountedFs::MountedFs(MountConfig cfg) : cfg_(std::move(cfg)) {
  if (const char* dir = getenv("DEFERFS_TEST_DIR"); dir != nullptr && *dir != '\0') {
    reference_ = true;
    tmp_ = root_ = MakeTempDir(dir, "ns");
    ok_ = !root_.empty();
    return;
  }
  tmp_ = MakeTempDir("/tmp", "deferfs-mnt");
  if (tmp_.empty()) return;
  root_ = tmp_ + "/mnt";
  log_ = tmp_ + "/daemon.log";
  if (mkdir(root_.c_str(), 0755) != 0) {
    ADD_FAILURE() << "mkdir " << root_ << ": " << strerror(errno);
    return;
  }
  if (!cfg_.existing_backing.empty()) {
    backing_ = cfg_.existing_backing;
  } else {
    backing_ = tmp_ + "/backing.img";
    if (!Format()) return;
  }
  meta_ = cfg_.meta.empty() ? backing_ + ".meta" : cfg_.meta;
  if (!Mount()) return;
  // Tests run RunAs users below the root: make it reachable whatever the
  // file system's initial root mode is.
  if (chmod(root_.c_str(), 0755) != 0) {
    ADD_FAILURE() << "chmod 0755 " << root_ << ": " << strerror(errno);
    return;
  }
  ok_ = true;
}

bool MountedFs::Format() {
  UniqueFd fd(open(backing_.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600));
  if (!fd.ok() || ftruncate(fd.get(), static_cast<off_t>(cfg_.size)) != 0) {
    ADD_FAILURE() << "creating sparse backing " << backing_ << ": " << strerror(errno);
    return false;
  }
  fd.reset();
  std::vector<std::string> args{"mkfs", backing_};
  if (!cfg_.meta.empty()) args.insert(args.end(), {"--meta", cfg_.meta});
  RunResult r = RunDeferfs(args);
  if (!r.succeeded()) {
    ADD_FAILURE() << "deferfs mkfs " << backing_ << ": " << r.Describe();
    return false;
  }
  return true;
}

MountedFs::~MountedFs() {
  if (!reference_) Unmount();
  RemoveTree(tmp_);
}

std::string MountedFs::path(std::string_view name) const {
  return name.empty() ? root_ : root_ + "/" + std::string(name);
}

std::string MountedFs::DaemonLog() const {
  if (log_.empty()) return "";
  std::ifstream in(log_);
  std::stringstream ss;
  ss << in.rdbuf();
  return Tail(ss.str());
}

bool MountedFs::Mount() {
  if (reference_) return true;
  if (daemon_ > 0) return true;
  std::string opts = "allow_other";
  for (const auto& o : cfg_.options) opts += "," + o;
  if (!cfg_.meta.empty()) opts += ",meta=" + cfg_.meta;
  if (cfg_.power_cut) opts += ",undo_log=" + UndoLogPath();
  if (const char* extra = getenv("DEFERFS_MOUNT_OPTS"); extra != nullptr && *extra != '\0') {
    opts += std::string(",") + extra;
  }
  std::vector<std::string> argv{DEFERFS_BIN, "mount", backing_, root_, "-f", "-o", opts};
  auto args = Argv(argv);
  UniqueFd log(open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  if (!log.ok()) {
    ADD_FAILURE() << "open " << log_ << ": " << strerror(errno);
    return false;
  }
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    ADD_FAILURE() << "fork: " << strerror(errno);
    return false;
  }
  if (pid == 0) {
    // If the test binary dies, SIGTERM makes the daemon unmount and exit.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(125);
    int null = open("/dev/null", O_RDONLY);
    if (null < 0 || dup2(null, 0) < 0 || dup2(log.get(), 1) < 0 || dup2(log.get(), 2) < 0) _exit(126);
    execv(args[0], args.data());
    _exit(127);
  }
  daemon_ = pid;

  auto deadline = Clock::now() + kMountDeadline;
  while (!IsLiveMount(root_)) {
    int status = 0;
    if (waitpid(daemon_, &status, WNOHANG) == daemon_) {
      daemon_ = -1;
      if (IsMounted(root_)) RunCommand({"umount", "-l", root_});
      ADD_FAILURE() << "deferfs mount " << backing_ << " " << root_ << " -o " << opts
                    << " exited before the mount was ready (" << DescribeStatus(status)
                    << "); its output:\n"
                    << DaemonLog();
      return false;
    }
    if (Clock::now() >= deadline) {
      ADD_FAILURE() << "mount not live after " << kMountDeadline.count() << "s; daemon output:\n"
                    << DaemonLog();
      kill(daemon_, SIGKILL);
      waitpid(daemon_, &status, 0);
      daemon_ = -1;
      if (IsMounted(root_)) RunCommand({"umount", "-l", root_});
      return false;
    }
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

bool MountedFs::Unmount() {
  if (reference_ || daemon_ <= 0) return true;
  bool clean = true;
  // fusermount3 fails with EBUSY while something still has a file open on
  // the mount; give stragglers (forked children) a moment.
  // A test that detached the mount itself (umount -l) only waits for the daemon.
  RunResult r;
  for (auto deadline = Clock::now() + 5s; IsMounted(root_);) {
    r = RunCommand({"fusermount3", "-u", root_}, 30s);
    if (r.succeeded() || Clock::now() >= deadline) break;
    std::this_thread::sleep_for(100ms);
  }
  if (IsMounted(root_) && !r.succeeded()) {
    ADD_FAILURE() << "fusermount3 -u " << root_ << ": " << r.Describe();
    clean = false;
    kill(daemon_, SIGTERM);  // the contract: SIGTERM unmounts and exits
  }
  int status = 0;
  if (WaitFor(daemon_, kExitDeadline, &status)) {
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      ADD_FAILURE() << "deferfs daemon ended with " << DescribeStatus(status)
                    << " after unmount (want exit 0); its output:\n"
                    << DaemonLog();
      clean = false;
    }
  } else {
    ADD_FAILURE() << "deferfs daemon did not exit within " << kExitDeadline.count()
                  << "s of the unmount; killing it. Its output:\n"
                  << DaemonLog();
    kill(daemon_, SIGKILL);
    waitpid(daemon_, &status, 0);
    clean = false;
  }
  daemon_ = -1;
  if (IsMounted(root_)) {
    ADD_FAILURE() << root_ << " still mounted after the daemon exited; detaching it";
    RunCommand({"umount", "-l", root_});
    clean = false;
  }
  return WaitBackingFree() && clean;
}

bool MountedFs::WaitBackingFree() {
  // The backing's flock can outlive the reaped daemon by a few ms (its last
  // file reference may be dropped asynchronously, e.g. by io_uring
  // teardown): wait, as a script would, before the next mount.
  if (WaitUntil([&] { return TryFlock(backing_) != EWOULDBLOCK; }, kExitDeadline)) return true;
  ADD_FAILURE() << backing_ << " is still flock()ed " << kExitDeadline.count()
                << "s after its daemon exited";
  return false;
}

bool MountedFs::Crash() {
  if (reference_ || daemon_ <= 0) return true;
  kill(daemon_, SIGKILL);
  int status = 0;
  bool clean = WaitFor(daemon_, kExitDeadline, &status);
  if (!clean) ADD_FAILURE() << "SIGKILLed deferfs daemon not reaped within " << kExitDeadline.count() << "s";
  daemon_ = -1;
  // The kernel keeps the dead connection mounted (ENOTCONN) until detached.
  if (IsMounted(root_) && !RunCommand({"umount", "-l", root_}).succeeded()) {
    ADD_FAILURE() << "umount -l " << root_ << " after the crash failed";
    clean = false;
  }
  if (!WaitBackingFree()) return false;
  if (cfg_.power_cut) {
    const auto files = cfg_.metadata_written_back ? deferfs::UnsyncedFiles::kWrittenBack : deferfs::UnsyncedFiles::kLost;
    deferfs::RolledBack undone;
    deferfs::Status s = deferfs::RollBackUnflushedWrites(UndoLogPath(), backing_, files, &undone);
    lost_bytes_ = undone.device_bytes;
    if (!s.ok()) {
      ADD_FAILURE() << "the power cut failed: " << s.ToString();
      return false;
    }
  }
  return clean;
}

bool MountedFs::StopWithSignal(int sig) {
  if (reference_ || daemon_ <= 0) return true;
  kill(daemon_, sig);
  return WaitForExit("signal " + std::to_string(sig));
}

bool MountedFs::WaitForExit(const std::string& cause) {
  if (reference_ || daemon_ <= 0) return true;
  int status = 0;
  bool clean = true;
  if (!WaitFor(daemon_, kExitDeadline, &status)) {
    ADD_FAILURE() << "deferfs daemon still running " << kExitDeadline.count() << "s after " << cause
                  << "; killing it. Its output:\n"
                  << DaemonLog();
    kill(daemon_, SIGKILL);
    waitpid(daemon_, &status, 0);
    clean = false;
  } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    ADD_FAILURE() << "deferfs daemon ended with " << DescribeStatus(status) << " after " << cause
                  << " (want exit 0); its output:\n"
                  << DaemonLog();
    clean = false;
  }
  daemon_ = -1;
  if (IsMounted(root_)) {
    ADD_FAILURE() << root_ << " still mounted after the daemon exited (" << cause << "); detaching it";
    RunCommand({"umount", "-l", root_});
    clean = false;
  }
  return WaitBackingFree() && clean;
}

}  // namespace deferfs_test
