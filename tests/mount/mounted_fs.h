// Test support for the mount tests: a RAII deferfs mount in a private temp
// dir, a command runner that captures output, and RunAs for permission tests.
//
// Failures inside these helpers are reported with ADD_FAILURE() (so the test
// that owns them fails with the daemon's stderr attached) and signalled to the
// caller by a false return / ok() == false, so tests can ASSERT on them.
//
// DEFERFS_TEST_DIR=/some/ext4/dir makes MountedFs use a fresh subdirectory of
// that directory instead of mounting deferfs (Remount() is then a no-op): the
// namespace tests run unchanged against ext4 to prove the tests themselves.
// DEFERFS_MOUNT_OPTS=a,b,c is appended to every mount's -o list.
#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#ifndef DEFERFS_BIN
#error "DEFERFS_BIN (path of the deferfs binary) must be defined"
#endif

namespace deferfs_test {

// Owns a file descriptor; closes it on destruction.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool ok() const { return fd_ >= 0; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// errno of a failed syscall-style return (-1), 0 on success: lets a test say
// EXPECT_EQ(Err(mkdir(p, 0755)), EEXIST).
inline int Err(long rc) { return rc < 0 ? errno : 0; }

// Result of RunCommand. `status` is the raw waitpid status.
struct RunResult {
  int status = -1;
  bool timed_out = false;
  std::string out;
  std::string err;

  bool exited() const;        // terminated normally (not by a signal, no timeout)
  int exit_code() const;      // WEXITSTATUS, or -1 if !exited()
  bool succeeded() const { return exited() && exit_code() == 0; }
  std::string Describe() const;  // for failure messages
};

// fork/exec argv (argv[0] is looked up in PATH), stdin from /dev/null, stdout
// and stderr captured. A child still running at the deadline is SIGKILLed.
// Output goes to memfds, not pipes, so a daemonizing child that keeps the
// descriptors cannot make us wait for EOF.
RunResult RunCommand(const std::vector<std::string>& argv,
                     std::chrono::milliseconds timeout = std::chrono::seconds(60));

// Runs DEFERFS_BIN with `args`.
RunResult RunDeferfs(const std::vector<std::string>& args,
                     std::chrono::milliseconds timeout = std::chrono::seconds(60));

// Forks; the child drops all supplementary groups, becomes gid/uid, runs fn
// and exits with its result (0 or an errno value). Returns the child's result,
// or 255 if it died abnormally, 254 if it could not drop privileges.
// fn runs in a forked child: it must not use gtest assertions.
int RunAs(uid_t uid, gid_t gid, const std::function<int()>& fn);

// A live mount: `path` is reachable and on another device than its parent.
bool IsLiveMount(const std::string& path);
// Anything mounted there, including a dead FUSE mount (ENOTCONN).
bool IsMounted(const std::string& path);

// flock(LOCK_EX|LOCK_NB) on `path` from a new open file description: 0 if
// it was free (the lock is dropped again at once), else errno — EWOULDBLOCK
// while a deferfs daemon holds the backing file.
int TryFlock(const std::string& path);

// Polls `cond` every 10 ms until it holds (true) or the timeout passes.
bool WaitUntil(const std::function<bool()>& cond,
               std::chrono::milliseconds timeout = std::chrono::seconds(20));

// mkdtemp(3) under `parent`; returns "" (and ADD_FAILUREs) on error.
std::string MakeTempDir(const std::string& parent, std::string_view prefix);

// A temp directory removed recursively on destruction — but never while
// something is still mounted below it.
class TempDir {
 public:
  explicit TempDir(const std::string& parent = "/tmp", std::string_view prefix = "deferfs-test");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(std::string_view name) const { return path_ + "/" + std::string(name); }

 private:
  std::string path_;
};

struct MountConfig {
  std::vector<std::string> options;  // extra -o options (allow_other is always added)
  uint64_t size = 256ull << 20;      // size of the sparse backing file
  std::string existing_backing;      // if set: mount this formatted backing, no mkfs
  std::string meta;                  // if set: passed as -o meta=; else deferfs' default
  // Crash() is a power cut: it also loses every device write that no flush
  // or FUA made durable (mounts with -o undo_log=, backend/undo_log.h), and
  // the metadata store's files lose what no sync covered, unless
  // `metadata_written_back` (then they keep all that reached them).
  bool power_cut = false;
  bool metadata_written_back = false;

  // Mount an already formatted backing file.
  static MountConfig Existing(std::string backing) {
    MountConfig c;
    c.existing_backing = std::move(backing);
    return c;
  }
};

// A deferfs mounted at <tmp>/mnt by a `deferfs mount -f` child process.
class MountedFs {
 public:
  explicit MountedFs(MountConfig cfg = {});
  ~MountedFs();
  MountedFs(const MountedFs&) = delete;
  MountedFs& operator=(const MountedFs&) = delete;

  // False if set-up failed (the failure has been reported).
  bool ok() const { return ok_; }
  // True when running against DEFERFS_TEST_DIR instead of deferfs.
  bool reference_mode() const { return reference_; }

  // The root of the file system under test (mountpoint, or ext4 subdir).
  const std::string& root() const { return root_; }
  // root()/name; path("") is root().
  std::string path(std::string_view name) const;
  // Backing file and meta dir ("" in reference mode).
  const std::string& backing() const { return backing_; }
  const std::string& meta() const { return meta_; }
  // The private temp dir (for extra files the test needs next to the mount).
  const std::string& tmp() const { return tmp_; }

  // fusermount3 -u, then the daemon must exit 0 within a deadline; otherwise
  // it is killed and the mount lazily detached. Returns once the backing
  // file's flock is free again, so Mount() can follow at once. True if all
  // went cleanly.
  bool Unmount();
  // Mounts again with the same backing, meta and options.
  bool Mount();
  bool Remount() { return Unmount() && Mount(); }
  bool mounted() const { return daemon_ > 0; }
  // The `deferfs mount -f` child, -1 when not mounted (for crash tests).
  pid_t daemon_pid() const { return daemon_; }
  // Sends `sig` to the daemon, which must unmount and exit 0 by itself.
  bool StopWithSignal(int sig);
  // After `cause` (a signal sent, the connection aborted) the daemon must
  // exit 0 by itself and leave nothing mounted; else it is killed, the mount
  // detached, and the test fails.
  bool WaitForExit(const std::string& cause);
  // SIGKILLs the daemon (a crash), reaps it and detaches the dead mount;
  // returns once the backing is free for Mount() to recover it. With
  // cfg.power_cut, then rolls the backing back to its last durable points.
  bool Crash();
  // Bytes of the device the last power cut restored to older contents.
  uint64_t lost_bytes() const { return lost_bytes_; }

  // The daemon's stderr/stdout so far.
  std::string DaemonLog() const;

 private:
  bool Format();
  bool WaitBackingFree();
  std::string UndoLogPath() const { return tmp_ + "/undo.log"; }

  MountConfig cfg_;
  bool reference_ = false;
  bool ok_ = false;
  std::string tmp_, root_, backing_, meta_, log_;
  pid_t daemon_ = -1;
  uint64_t lost_bytes_ = 0;
};

}  // namespace deferfs_test
