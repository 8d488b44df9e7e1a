// Shared helpers of the data-path and completion-mode mount tests: the mount
// variants every test is parameterised over, `deferfs stats --json` as a
// map and its live gauges back at idle, fio as a child process, aligned
// buffers, byte patterns, pre-filled backing files, and a forked workload
// with a deadline (a hang becomes a failure, never a stuck CI job).
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/mounted_fs.h"

namespace deferfs_test {

// ------------------------------------------------------------ mount variants

inline struct statvfs StatVfs(const std::string& path) {
  struct statvfs sv{};
  if (statvfs(path.c_str(), &sv) != 0) ADD_FAILURE() << "statvfs " << path << ": " << strerror(errno);
  return sv;
}

inline const std::vector<std::string>& AllModes() {
  static const std::vector<std::string> modes = {"inline", "workqueue", "defer", "auto", "sync"};
  return modes;
}

// One way to mount deferfs: a completion mode and its thread counts.
struct MountVariant {
  std::string mode;
  int workers = 2;
  int pollers = 1;
  int cthreads = 1;

  std::vector<std::string> Options() const {
    return {"completion=" + mode, "workers=" + std::to_string(workers), "pollers=" + std::to_string(pollers),
            "cthreads=" + std::to_string(cthreads)};
  }
  // What the mount log and `deferfs stats` report for it.
  std::string Describe() const {
    return "completion=" + mode + ",workers=" + std::to_string(workers) + ",pollers=" + std::to_string(pollers) +
           ",cthreads=" + std::to_string(cthreads);
  }
  std::string Name() const {
    return mode + "_w" + std::to_string(workers) + "p" + std::to_string(pollers) + "c" + std::to_string(cthreads);
  }
  bool async() const { return mode != "sync"; }

  MountConfig Config(uint64_t size = 256ull << 20) const {
    MountConfig c;
    c.options = Options();
    c.size = size;
    return c;
  }
  MountConfig ConfigFor(const std::string& existing_backing) const {
    MountConfig c = MountConfig::Existing(existing_backing);
    c.options = Options();
    return c;
  }
};

inline void PrintTo(const MountVariant& v, std::ostream* os) { *os << v.Describe(); }

// Every mode with the same thread counts.
inline std::vector<MountVariant> EveryMode(int workers, int pollers, int cthreads) {
  std::vector<MountVariant> out;
  for (const auto& m : AllModes()) out.push_back({m, workers, pollers, cthreads});
  return out;
}

struct VariantName {
  std::string operator()(const ::testing::TestParamInfo<MountVariant>& info) const { return info.param.Name(); }
};

// ------------------------------------------------------------------- stats

// `deferfs stats MNT --json`, flattened to "group.name" -> value text.
class Stats {
 public:
  static Stats Read(const MountedFs& fs, bool reset = false) {
    std::vector<std::string> args{"stats", fs.root(), "--json"};
    if (reset) args.push_back("--reset");
    RunResult r = RunDeferfs(args, std::chrono::seconds(30));
    Stats s;
    s.raw_ = r.out;
    if (!r.succeeded()) {
      ADD_FAILURE() << "deferfs stats " << fs.root() << " --json: " << r.Describe();
      return s;
    }
    size_t i = 0;
    s.ok_ = s.Object(r.out, &i, "");
    if (!s.ok_) ADD_FAILURE() << "cannot parse the stats JSON (" << s.error_ << "): " << r.out;
    return s;
  }

  bool ok() const { return ok_; }
  const std::string& raw() const { return raw_; }
  std::string text(const std::string& key) const {
    auto it = values_.find(key);
    return it == values_.end() ? "" : it->second;
  }
  // A counter; a missing key is a test failure (and reads as 0).
  uint64_t operator[](const std::string& key) const {
    auto it = values_.find(key);
    if (it == values_.end()) {
      ADD_FAILURE() << "stats have no \"" << key << "\": " << raw_;
      return 0;
    }
    return std::strtoull(it->second.c_str(), nullptr, 10);
  }
  // How much counter `key` grew since `earlier` was read.
  uint64_t Since(const Stats& earlier, const std::string& key) const { return (*this)[key] - earlier[key]; }
  // All completions, whatever path they took.
  uint64_t completions() const {
    const Stats& s = *this;
    return s["completions.inline_poller"] + s["completions.deferred_issuer"] + s["completions.workqueue"] +
           s["completions.sync_issuer"] + s["completions.at_submit"];
  }
  // The counters that matter for a completion-path assertion, for messages.
  std::string Summary() const {
    std::string out;
    for (const char* k : {"mode", "dio.reads", "dio.writes", "dio.pure_overwrites", "dio.errors",
                          "completions.inline_poller", "completions.deferred_issuer", "completions.workqueue",
                          "completions.sync_issuer", "completions.at_submit", "dio_inflight"}) {
      out += std::string(k) + "=" + text(k) + " ";
    }
    return out;
  }

 private:
  static void Skip(const std::string& s, size_t* i) {
    while (*i < s.size() && std::isspace(static_cast<unsigned char>(s[*i]))) ++*i;
  }
  static bool Eat(const std::string& s, size_t* i, char c) {
    Skip(s, i);
    if (*i >= s.size() || s[*i] != c) return false;
    ++*i;
    return true;
  }
  static bool String(const std::string& s, size_t* i, std::string* out) {
    if (!Eat(s, i, '"')) return false;
    while (*i < s.size() && s[*i] != '"') out->push_back(s[(*i)++]);
    return Eat(s, i, '"');
  }
  // An array of numbers and arrays (a latency histogram), kept as its text.
  static bool Array(const std::string& s, size_t* i, std::string* out) {
    const size_t start = *i;
    int depth = 0;
    do {
      if (*i >= s.size() || s[*i] == '"' || s[*i] == '{') return false;
      depth += (s[*i] == '[') - (s[*i] == ']');
      ++*i;
    } while (depth > 0);
    *out = s.substr(start, *i - start);
    return true;
  }
  // The report is objects of numbers, strings and arrays (fs/stats.cc). A
  // key twice in one object fails the parse: most JSON readers would keep
  // only the last.
  bool Object(const std::string& s, size_t* i, const std::string& prefix) {
    if (!Eat(s, i, '{')) return false;
    if (Eat(s, i, '}')) return true;
    std::set<std::string> keys;
    do {
      std::string key;
      if (!String(s, i, &key) || !Eat(s, i, ':')) return false;
      std::string path = prefix.empty() ? key : prefix + "." + key;
      if (!keys.insert(key).second) {
        error_ = "\"" + path + "\" appears twice";
        return false;
      }
      Skip(s, i);
      if (*i < s.size() && s[*i] == '{') {
        if (!Object(s, i, path)) return false;
      } else if (*i < s.size() && s[*i] == '"') {
        std::string v;
        if (!String(s, i, &v)) return false;
        values_[path] = v;
      } else if (*i < s.size() && s[*i] == '[') {
        std::string v;
        if (!Array(s, i, &v)) return false;
        values_[path] = v;
      } else {
        size_t start = *i;
        while (*i < s.size() && (std::isalnum(static_cast<unsigned char>(s[*i])) || s[*i] == '.' || s[*i] == '-' ||
                                 s[*i] == '+')) {
          ++*i;
        }
        if (*i == start) return false;
        values_[path] = s.substr(start, *i - start);
      }
    } while (Eat(s, i, ','));
    return Eat(s, i, '}');
  }

  bool ok_ = false;
  std::string error_ = "not the report's shape";
  std::string raw_;
  std::map<std::string, std::string> values_;
};

// ------------------------------------------------------------ live gauges

// The gauges that must read idle once every application is gone (no
// request, buffer or file handle leaked), for a mount with `workers` FUSE
// workers; "" if all do.
inline std::string NotIdle(const Stats& s, int workers) {
  std::string out;
  auto want = [&](const std::string& key, uint64_t v) {
    if (s[key] != v) out += key + "=" + s.text(key) + " (want " + std::to_string(v) + ") ";
  };
  want("live.fuse_requests", 0);
  want("live.request_buffers", 0);
  want("live.open_files", 0);
  want("dio_inflight", 0);
  // Each idle FUSE worker keeps exactly one receive buffer, and with
  // transport=uring each ring slot its own.
  const uint64_t kept = static_cast<uint64_t>(workers) + s["buffers.ring"];
  want("buffers.in_use", kept);
  want("buffers.free", s["buffers.total"] - kept);
  return out;
}

// Polls the stats until the gauges are idle; the kernel releases files and
// answers of killed processes asynchronously, so this may take a moment.
inline ::testing::AssertionResult BecomesIdle(const MountedFs& fs, int workers) {
  std::string last;
  bool idle = WaitUntil(
      [&] {
        Stats s = Stats::Read(fs);
        last = s.ok() ? NotIdle(s, workers) : "stats failed";
        return last.empty();
      },
      std::chrono::seconds(120));
  if (idle) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "gauges not idle after 120 s: " << last << "\nraw: " << Stats::Read(fs).raw();
}

// A test knob from the environment (DEFERFS_CRASH_ROUNDS, say), or `fallback`.
inline uint64_t EnvOr(const char* name, uint64_t fallback) {
  const char* v = getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 0) : fallback;
}

// --------------------------------------------------------------------- fio

// fio --name=NAME --filename=FILE ARGS...; verify failures make it exit
// non-zero (the callers pass --verify_fatal=1).
inline RunResult RunFio(const std::string& name, const std::string& file, const std::vector<std::string>& args,
                        std::chrono::milliseconds timeout = std::chrono::seconds(180)) {
  // No verify-state files: fio would leave them in the working directory.
  std::vector<std::string> argv{"fio", "--name=" + name, "--filename=" + file, "--output-format=normal",
                                "--verify_state_save=0"};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCommand(argv, timeout);
}

inline ::testing::AssertionResult FioSucceeded(const RunResult& r, const MountedFs& fs) {
  if (r.succeeded()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "fio failed: " << r.Describe() << "\ndaemon log:\n" << fs.DaemonLog();
}

// ---------------------------------------------------------------- buffers

// A zeroed buffer aligned for O_DIRECT.
class AlignedBuf {
 public:
  explicit AlignedBuf(size_t size, size_t align = 4096) : size_(size) {
    void* p = nullptr;
    if (posix_memalign(&p, align, size ? size : align) != 0) std::abort();
    std::memset(p, 0, size ? size : align);
    p_.reset(static_cast<uint8_t*>(p));
  }
  uint8_t* data() { return p_.get(); }
  const uint8_t* data() const { return p_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> p_;
  size_t size_;
};

// Random bytes that never contain `avoid` (so a stale-data pattern made of
// `avoid` bytes cannot be mistaken for data the test wrote).
inline void FillRandom(std::mt19937_64& rng, uint8_t* p, size_t n, int avoid = -1) {
  for (size_t i = 0; i < n; i++) {
    uint8_t b = static_cast<uint8_t>(rng());
    if (b == avoid) b ^= 0x01;
    p[i] = b;
  }
}

inline std::vector<uint8_t> RandomBytes(std::mt19937_64& rng, size_t n, int avoid = -1) {
  std::vector<uint8_t> v(n);
  FillRandom(rng, v.data(), n, avoid);
  return v;
}

// ------------------------------------------------------------------ IO

// pwrite/pread until done; 0 or the errno of the first failure (EIO for an
// unexpected 0-byte transfer). *done (if given) counts the bytes moved.
inline int PwriteFull(int fd, const void* buf, size_t len, off_t off, size_t* done = nullptr) {
  size_t n = 0;
  int err = 0;
  while (n < len) {
    ssize_t r = pwrite(fd, static_cast<const char*>(buf) + n, len - n, off + static_cast<off_t>(n));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      err = r < 0 ? errno : EIO;
      break;
    }
    n += static_cast<size_t>(r);
  }
  if (done) *done = n;
  return err;
}

// Reads up to len bytes (stops at EOF); returns the count, or -errno.
inline ssize_t PreadUpTo(int fd, void* buf, size_t len, off_t off) {
  size_t n = 0;
  while (n < len) {
    ssize_t r = pread(fd, static_cast<char*>(buf) + n, len - n, off + static_cast<off_t>(n));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -errno;
    if (r == 0) break;
    n += static_cast<size_t>(r);
  }
  return static_cast<ssize_t>(n);
}

// The whole file through an O_DIRECT descriptor (the device's view, not the
// page cache's); empty and an ADD_FAILURE on error.
inline std::vector<uint8_t> ReadAllDirect(const std::string& path, bool* ok = nullptr) {
  if (ok) *ok = false;
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC));
  struct stat st{};
  if (!fd.ok() || fstat(fd.get(), &st) != 0) {
    ADD_FAILURE() << "open/fstat O_DIRECT " << path << ": " << strerror(errno);
    return {};
  }
  const size_t size = static_cast<size_t>(st.st_size);
  AlignedBuf buf((size + 4095) & ~size_t{4095});
  ssize_t n = PreadUpTo(fd.get(), buf.data(), buf.size(), 0);
  if (n < 0 || static_cast<size_t>(n) != size) {
    ADD_FAILURE() << "O_DIRECT read of " << path << " returned " << n << " of " << size << " bytes"
                  << (n < 0 ? std::string(": ") + strerror(static_cast<int>(-n)) : "");
    return {};
  }
  if (ok) *ok = true;
  return std::vector<uint8_t>(buf.data(), buf.data() + size);
}

// Creates `path` with `bytes` (a multiple of 4 KiB) written through O_DIRECT.
inline ::testing::AssertionResult WriteAllDirect(const std::string& path, const std::vector<uint8_t>& bytes) {
  UniqueFd fd(open(path.c_str(), O_CREAT | O_WRONLY | O_DIRECT | O_CLOEXEC, 0644));
  if (!fd.ok()) return ::testing::AssertionFailure() << "open O_DIRECT " << path << ": " << strerror(errno);
  AlignedBuf b(bytes.size());
  std::memcpy(b.data(), bytes.data(), bytes.size());
  if (int e = PwriteFull(fd.get(), b.data(), b.size(), 0); e != 0) {
    return ::testing::AssertionFailure() << "O_DIRECT write of " << path << ": " << strerror(e);
  }
  return ::testing::AssertionSuccess();
}

// Byte-for-byte equality with the first difference in the message.
inline ::testing::AssertionResult SameBytes(const uint8_t* want, const uint8_t* got, size_t n, uint64_t base = 0) {
  for (size_t i = 0; i < n; i++) {
    if (want[i] != got[i]) {
      size_t end = i;
      while (end < n && want[end] != got[end]) end++;
      return ::testing::AssertionFailure()
             << "bytes differ from offset " << base + i << " (want 0x" << std::hex << int{want[i]} << ", got 0x"
             << int{got[i]} << std::dec << "), " << end - i << " differing bytes in a row";
    }
  }
  return ::testing::AssertionSuccess();
}

inline ::testing::AssertionResult SameBytes(const std::vector<uint8_t>& want, const std::vector<uint8_t>& got) {
  if (want.size() != got.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << ", want " << want.size();
  }
  return SameBytes(want.data(), got.data(), want.size());
}

// First offset holding `b` in [p, p+n), or -1.
inline int64_t FindByte(const uint8_t* p, size_t n, uint8_t b) {
  const void* hit = std::memchr(p, b, n);
  return hit ? static_cast<const uint8_t*>(hit) - p : -1;
}

// ------------------------------------------------------------- backings

// A backing file of `size` bytes, every byte `fill` (written and fsynced, so
// its blocks really hold the pattern), formatted by `deferfs mkfs` — which
// does not zero the data area. False (with a failure) on error.
inline bool MakePrefilledBacking(const std::string& path, uint64_t size, uint8_t fill) {
  {
    UniqueFd fd(open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600));
    if (!fd.ok()) {
      ADD_FAILURE() << "create " << path << ": " << strerror(errno);
      return false;
    }
    std::vector<uint8_t> chunk(1 << 20, fill);
    for (uint64_t off = 0; off < size; off += chunk.size()) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(chunk.size(), size - off));
      if (int e = PwriteFull(fd.get(), chunk.data(), n, static_cast<off_t>(off)); e != 0) {
        ADD_FAILURE() << "fill " << path << ": " << strerror(e);
        return false;
      }
    }
    if (fsync(fd.get()) != 0) {
      ADD_FAILURE() << "fsync " << path << ": " << strerror(errno);
      return false;
    }
  }
  RunResult r = RunDeferfs({"mkfs", path});
  if (!r.succeeded()) {
    ADD_FAILURE() << "deferfs mkfs " << path << ": " << r.Describe();
    return false;
  }
  return true;
}

// ---------------------------------------------------- workload with deadline

struct ChildOutcome {
  bool timed_out = false;
  bool exited_ok = false;  // exit 0
  std::string message;     // what the child reported, or how it ended
};

// `fn` run in a forked child, waited for under a deadline. fn returns "" on
// success, else what went wrong (it must not use gtest assertions).
//
// Start children only while the forking thread is the process's only one:
// a child inherits just that thread, so a lock another thread holds at the
// instant of fork (the sanitizers' allocator has such locks) is never
// released in the child, which hangs at its next allocation.
class Child {
 public:
  explicit Child(const std::function<std::string()>& fn)
      : msg_(memfd_create("child-msg", MFD_CLOEXEC)), started_(std::chrono::steady_clock::now()) {
    if (!msg_.ok()) {
      error_ = std::string("memfd_create: ") + strerror(errno);
      return;
    }
    fflush(nullptr);
    pid_ = fork();
    if (pid_ < 0) {
      error_ = std::string("fork: ") + strerror(errno);
      return;
    }
    if (pid_ == 0) {
      std::string m = fn();
      if (!m.empty() && write(msg_.get(), m.data(), m.size()) < 0) _exit(3);
      _exit(m.empty() ? 0 : 1);
    }
  }
  Child(Child&& o) noexcept
      : pid_(std::exchange(o.pid_, -1)), msg_(std::move(o.msg_)), started_(o.started_), error_(std::move(o.error_)) {}
  Child& operator=(Child&&) = delete;
  Child(const Child&) = delete;
  // A child never waited for is killed and, unless stuck in a hung daemon's
  // request, reaped.
  ~Child() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      WaitUntil([&] { return waitpid(pid_, nullptr, WNOHANG) == pid_; }, std::chrono::seconds(10));
    }
  }

  // Waits until `budget` after the start. A child still running then is
  // SIGKILLed; if even that does not end it within a grace period (stuck in
  // an uninterruptible FUSE request of a hung daemon), the daemon is
  // SIGKILLed too, which aborts the FUSE connection — the fixture's Unmount
  // then reports the killed daemon and cleans up the mount.
  ChildOutcome Wait(std::chrono::seconds budget, pid_t daemon_to_kill_if_stuck) {
    ChildOutcome out;
    if (pid_ < 0) {
      out.message = error_.empty() ? "already waited for" : error_;
      return out;
    }
    const pid_t pid = std::exchange(pid_, -1);
    auto reap = [&](std::chrono::milliseconds within, int* status) {
      return WaitUntil([&] { return waitpid(pid, status, WNOHANG) == pid; }, within);
    };
    int status = 0;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(started_ + budget -
                                                                      std::chrono::steady_clock::now());
    if (!reap(std::max(left, std::chrono::milliseconds(0)), &status)) {
      out.timed_out = true;
      kill(pid, SIGKILL);
      if (!reap(std::chrono::seconds(10), &status) && daemon_to_kill_if_stuck > 0) {
        kill(daemon_to_kill_if_stuck, SIGKILL);
        reap(std::chrono::seconds(30), &status);
      }
      out.message = "still running after " + std::to_string(budget.count()) + " s (killed)";
      return out;
    }
    std::string text;
    char buf[4096];
    for (off_t off = 0;;) {
      ssize_t n = pread(msg_.get(), buf, sizeof buf, off);
      if (n <= 0) break;
      text.append(buf, static_cast<size_t>(n));
      off += n;
    }
    out.exited_ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (!text.empty()) {
      out.message = text;
    } else if (WIFSIGNALED(status)) {
      out.message = std::string("killed by signal ") + strsignal(WTERMSIG(status));
    } else if (!out.exited_ok) {
      out.message = "exit status " + std::to_string(WEXITSTATUS(status));
    }
    return out;
  }

 private:
  pid_t pid_ = -1;
  UniqueFd msg_;
  std::chrono::steady_clock::time_point started_;
  std::string error_;  // why there is no child
};

// One child, started and waited for (see Child: no other thread may run).
inline ChildOutcome RunWithDeadline(const std::function<std::string()>& fn, std::chrono::seconds deadline,
                                    pid_t daemon_to_kill_if_stuck) {
  return Child(fn).Wait(deadline, daemon_to_kill_if_stuck);
}

}  // namespace deferfs_test
