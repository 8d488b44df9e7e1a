// deferfs mount: validates everything, mounts, serves until unmounted.
// Without -f the process forks first and the parent waits on a pipe until the
// child has the mount ready (or failed): a script can use the mount on its
// next line, and every error still reaches the terminal as one line.
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include "backend/device.h"
#include "backend/log.h"
#include "backend/metadata.h"
#include "backend/superblock.h"
#include "fs/filesystem.h"
#include "fs/fuse_ops.h"
#include "mount/backing_lock.h"
#include "mount/commands.h"
#include "mount/fuse_uring.h"
#include "mount/mountinfo.h"
#include "mount/options.h"
#include "mount/worker_loop.h"

namespace deferfs {
namespace {

// The daemon's word to the waiting parent that the mount is up: a byte no
// error line holds. An explicit word, because a daemon that dies (SIGKILL,
// a crash) closes the pipe as silently as one that succeeded.
constexpr char kReady = '\0';

// Where errors and the startup line go: the terminal, or the waiting parent.
class Reporter {
 public:
  explicit Reporter(int pipe_fd) : fd_(pipe_fd) {}
  int Error(const std::string& msg) {
    if (fd_ < 0) return Fail(msg);
    std::string line = msg + "\n";
    [[maybe_unused]] ssize_t n = write(fd_, line.data(), line.size());
    return 1;
  }
  void Ready() {
    if (fd_ < 0) return;
    [[maybe_unused]] ssize_t n = write(fd_, &kReady, 1);
    close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

// Confines this process, before it has any other thread, to `cpus`: every
// thread started later (workers, pollers, RocksDB's) inherits the mask.
// io_uring's own workers (iou-wrk) do not: they follow the cpuset.
Status ConfineToCpus(const std::vector<unsigned>& cpus) {
  const std::string opt = "'cpus=" + CpuListText(cpus) + "'";
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) {
    return Status::Error(errno, "mount option " + opt + ": cannot read this process's CPUs: " + strerror(errno));
  }
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<unsigned> missing, usable;
  for (unsigned c : cpus) {
    CPU_SET(c, &set);
    if (!CPU_ISSET(c, &allowed)) missing.push_back(c);
  }
  if (!missing.empty()) {
    for (unsigned c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &allowed)) usable.push_back(c);
    }
    return Status::Invalid("bad mount option " + opt + ": this process may not run on CPU " + CpuListText(missing) +
                           ": choose among " + CpuListText(usable));
  }
  if (sched_setaffinity(0, sizeof(set), &set) != 0) {
    return Status::Error(errno, "mount option " + opt + ": cannot set the daemon's CPUs: " + strerror(errno));
  }
  return Status::Ok();
}

// Parent side of the daemon handshake: kReady, or the daemon's error line,
// or nothing at all when it died before it could say either.
int WaitForChild(int pipe_fd, pid_t child, const std::string& backing) {
  std::string msg;
  char buf[512];
  for (ssize_t n; (n = read(pipe_fd, buf, sizeof(buf))) != 0;) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    msg.append(buf, static_cast<size_t>(n));
  }
  if (msg.size() == 1 && msg[0] == kReady) return 0;
  int status = 0;
  while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  if (!msg.empty()) {
    if (msg.back() == '\n') msg.pop_back();
    return Fail(msg);
  }
  const std::string how = WIFSIGNALED(status) ? std::string("killed by ") + strsignal(WTERMSIG(status))
                                              : "exit status " + std::to_string(WEXITSTATUS(status));
  // Between its mount and its word, it leaves the mount behind, dead.
  const std::string dead = DeferfsMountOf(backing);
  return Fail("the mount daemon died before the mount was up (" + how + "): " +
              (dead.empty() ? "nothing is mounted" : "umount the dead mount at " + dead) +
              "; the system log says why (journalctl -t deferfs)");
}

// `path` made absolute against the working directory; as given if that fails.
std::string Absolute(const std::string& path) {
  std::error_code ec;
  std::filesystem::path abs = std::filesystem::absolute(path, ec);
  return ec ? path : abs.string();  // not normalized: "link/.." must mean what it meant
}

}  // namespace

int MountCommand(const MountArgs& args) {
  MountOptions opts;
  for (const std::string& o : args.options) {
    Status s = ParseMountOptions(o, &opts);
    if (!s.ok()) return Fail(s.message());
  }
  if (Status s = CheckMountOptions(opts); !s.ok()) return Fail(s.message());
  const bool foreground = args.foreground;
  std::string backing = args.backing;
  std::string mountpoint = args.mountpoint;

  if (!opts.cpus.empty()) {
    if (Status c = ConfineToCpus(opts.cpus); !c.ok()) return Fail(c.message());
  }
  if (opts.workers == 0) opts.workers = DefaultWorkers();  // counts the CPUs cpus= left
  if (opts.transport == FuseTransport::kUring && !FuseUring::KernelEnabled()) {
    return Fail("transport=uring: this kernel's FUSE over io_uring is off or absent (it needs Linux 6.14+ and, as "
                "root, 'echo Y > /sys/module/fuse/parameters/enable_uring'): switch it on or mount with transport=dev");
  }
  struct stat st;
  if (stat(mountpoint.c_str(), &st) != 0) return Fail("mountpoint " + mountpoint + " does not exist: create it with mkdir");
  if (!S_ISDIR(st.st_mode)) return Fail("mountpoint " + mountpoint + " is not a directory");
  if (stat(backing.c_str(), &st) != 0) {
    return Fail("backing device " + backing + " does not exist: create it with 'deferfs mkfs " + backing + " --size SIZE'");
  }
  char* abs_mnt = realpath(mountpoint.c_str(), nullptr);
  if (abs_mnt) {
    mountpoint = abs_mnt;
    free(abs_mnt);
  }
  // The daemon leaves its working directory for / once mounted, and RocksDB
  // opens files by the store's path for as long as it runs: the paths kept
  // must be absolute. Made so by prefixing the working directory, no more, so
  // that the default metadata directory (BACKING.meta) is the one mkfs made
  // through the same spelling.
  backing = Absolute(backing);
  if (!opts.meta_dir.empty()) opts.meta_dir = Absolute(opts.meta_dir);
  if (!opts.undo_log.empty()) opts.undo_log = Absolute(opts.undo_log);

  // Signals are taken through a signalfd: block them before any thread
  // (RocksDB's included) exists, so none is delivered elsewhere.
  sigset_t sigs;
  sigemptyset(&sigs);
  for (int s : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&sigs, s);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  int report_fd = -1;
  if (!foreground) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) return Fail(std::string("pipe: ") + strerror(errno));
    pid_t pid = fork();
    if (pid < 0) return Fail(std::string("fork: ") + strerror(errno));
    if (pid > 0) {
      close(p[1]);
      return WaitForChild(p[0], pid, backing);
    }
    close(p[0]);
    setsid();
    report_fd = p[1];
  }
  LogInit(opts.log_level, /*use_syslog=*/!foreground);
  Reporter report(report_fd);

  std::unique_ptr<Device> dev;
  Status s = Device::Open(backing, &dev);
  // Nothing is mounted yet: a wait for the backing stays interruptible.
  pthread_sigmask(SIG_UNBLOCK, &sigs, nullptr);
  if (s.ok()) s = LockBacking(dev.get(), backing);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  if (s.ok() && !opts.undo_log.empty()) s = dev->KeepUndoLog(opts.undo_log);
  if (!s.ok()) return report.Error(s.message());
  if (opts.blkdev && !dev->is_block_device()) {
    return report.Error("mount option 'blkdev' needs a block device as the backing, and " + backing +
                        " is a file: leave blkdev out");
  }
  if (dev->size() < kSuperblockBytes) {
    return report.Error(backing + " is too small to hold a deferfs: format it with 'deferfs mkfs " + backing + " --size SIZE'");
  }
  AlignedBuffer sbuf(kSuperblockBytes, std::max<uint32_t>(dev->dio_align(), 4096));
  Superblock sb;
  s = dev->ReadSync(0, sbuf.data(), kSuperblockBytes);
  if (s.ok()) s = DecodeSuperblock(sbuf.bytes(), backing, &sb);
  if (!s.ok()) return report.Error(s.message());
  if (sb.device_bytes > dev->size()) {
    return report.Error(backing + " is shorter (" + std::to_string(dev->size()) + " bytes) than its deferfs (" +
                        std::to_string(sb.device_bytes) + " bytes): it was truncated; restore it or reformat");
  }
  if (opts.meta_dir.empty()) opts.meta_dir = DefaultMetaDir(backing, dev->is_block_device(), UuidToString(sb.uuid));
  std::unique_ptr<MetaStore> meta;
  s = opts.read_only ? MetaStore::OpenReadOnly(opts.meta_dir, sb.uuid, &meta) : MetaStore::Open(opts.meta_dir, sb.uuid, &meta, dev->undo_log());
  if (!s.ok()) return report.Error(s.message());

  FsOptions fopt;
  fopt.completion = opts.completion;
  fopt.pollers = opts.pollers;
  fopt.cthreads = opts.cthreads;
  fopt.ring_depth = opts.ring_depth;
  fopt.commit_interval_s = opts.commit;
  fopt.io_buffers = std::max(128u, 2 * opts.workers);
  // FUSE over io_uring: each ring entry keeps a buffer.
  unsigned uring_depth = 0;
  if (opts.transport == FuseTransport::kUring) {
    uring_depth = opts.uring_depth ? opts.uring_depth : FuseUring::DefaultDepth(FuseUring::KernelQueues());
    fopt.io_buffers += FuseUring::KernelQueues() * uring_depth;
  }
  fopt.workers = opts.workers;
  fopt.fault_inject = opts.fault_inject;
  fopt.read_only = opts.read_only;
  fopt.sync = opts.sync;
  fopt.dirsync = opts.dirsync;
  fopt.max_read = opts.max_read;
  std::unique_ptr<Filesystem> fs;
  s = Filesystem::Mount(std::move(dev), std::move(meta), sb, fopt, &fs);
  if (!s.ok()) return report.Error(s.message());

  // An absolute source in the mount table, as mount(8) and umount(8) expect.
  std::string source = backing;
  if (char* abs = realpath(backing.c_str(), nullptr)) {
    source = abs;
    free(abs);
  }
  // libfuse's -o splits at ',': each option goes in with libfuse's own
  // escaping, so that a backing named "a,b.img" stays one fsname.
  char* joined = nullptr;
  bool built = fuse_opt_add_opt(&joined, "default_permissions") == 0 &&
               fuse_opt_add_opt_escaped(&joined, ("fsname=" + source).c_str()) == 0 &&
               fuse_opt_add_opt(&joined, "subtype=deferfs") == 0;
  for (const auto& o : opts.fuse_opts) built = built && fuse_opt_add_opt_escaped(&joined, o.c_str()) == 0;
  const std::string fuse_o = joined ? joined : "";
  free(joined);
  if (!built) return report.Error("out of memory for the FUSE mount options");
  const char* fargv[] = {"deferfs", "-o", fuse_o.c_str()};
  fuse_args fargs = FUSE_ARGS_INIT(3, const_cast<char**>(fargv));
  fuse_session* se = fuse_session_new(&fargs, &FuseOps(), sizeof(fuse_lowlevel_ops), fs.get());
  fuse_opt_free_args(&fargs);  // the parser may have rebuilt argv on the heap
  if (se == nullptr) return report.Error("cannot create the FUSE session (options: " + fuse_o + ")");
  LogDebug("FUSE mount options: %s", fuse_o.c_str());
  char real_mountpoint[PATH_MAX];  // before mounting: resolving it after would ask the mount
  if (realpath(mountpoint.c_str(), real_mountpoint) == nullptr) real_mountpoint[0] = '\0';
  if (fuse_session_mount(se, mountpoint.c_str()) != 0) {
    fuse_session_destroy(se);
    return report.Error("cannot mount on " + mountpoint + ": is FUSE available (modprobe fuse) and the mountpoint usable?");
  }
  const std::string device = FuseDeviceAt(real_mountpoint);  // this connection's, "0:N"
  // With the device, what tells our mount from one that later gets the same
  // device number (a mount of our own backing cannot come before we let go
  // of its lock; any other has another source).
  const std::string mounted_source = device.empty() ? "" : MountSourceOf(device);
  if (Status m = MarkServed(fs->device()); !m.ok()) LogWarn("%s", m.message().c_str());
  std::unique_ptr<WorkerPool> pool;
  s = WorkerPool::Start(se, fs.get(), opts.workers, uring_depth, &pool);
  if (!s.ok()) {
    fuse_session_unmount(se);
    fuse_session_destroy(se);
    return report.Error(s.message());
  }

  LogInfo("mounted %s on %s (%s, uuid %s, metadata %s)", backing.c_str(), mountpoint.c_str(),
          opts.Describe().c_str(), UuidToString(sb.uuid).c_str(), opts.meta_dir.c_str());
  report.Ready();
  if (!foreground) {
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull >= 0) {
      dup2(devnull, STDIN_FILENO);
      dup2(devnull, STDOUT_FILENO);
      dup2(devnull, STDERR_FILENO);
      close(devnull);
    }
    [[maybe_unused]] int rc = chdir("/");
  }

  // Serve until unmounted (a worker signals exit_fd) or told to stop.
  UniqueFd sfd(signalfd(-1, &sigs, SFD_CLOEXEC));
  pollfd pfds[2] = {{sfd.get(), POLLIN, 0}, {pool->exit_fd(), POLLIN, 0}};
  while (poll(pfds, 2, -1) < 0 && errno == EINTR) {
  }
  if (pfds[0].revents & POLLIN) {
    signalfd_siginfo si{};
    if (read(sfd.get(), &si, sizeof(si)) == sizeof(si)) {
      LogInfo("%s: unmounting %s", strsignal(static_cast<int>(si.ssi_signo)), mountpoint.c_str());
    }
  }
  // Unmounted by the kernel (or the connection failed): serving is over, and
  // a command that wants the backing now waits for the rest instead of
  // refusing it as mounted.
  if (pfds[1].revents & POLLIN) UnmarkServed(fs->device());
  fuse_session_exit(se);
  pool->Stop();
  // An unmount goes by path and reaches only the topmost mount there: with
  // another filesystem mounted over ours (a signal, not umount, brought us
  // here), it would take that one down instead. Ours stays, dead underneath.
  int rc = 0;
  const std::string at = device.empty() ? "" : MountPathOf(device, mounted_source);
  const bool covered = !at.empty() && TopDeviceAt(at) != device;
  if (covered) {
    LogError("cannot unmount %s: another filesystem is mounted over it; unmount that one, then this one "
             "(umount -l %s)", at.c_str(), at.c_str());
    rc = 1;
  } else {
    fuse_session_unmount(se);  // no-op when the kernel already unmounted
  }
  fuse_session_destroy(se);
  // When the kernel aborted the connection (fusectl's abort: the rescue of a
  // hung mount), libfuse leaves the dead mount behind, where every access
  // fails with ENOTCONN. Nothing can use it again: detach it. Found by its
  // device and source, which no other mount has, and before the backing's
  // lock is released (fs.reset()), after which another mount of it may come.
  if (const std::string dead = device.empty() || covered ? "" : MountPathOf(device, mounted_source);
      !dead.empty()) {
    if (umount2(dead.c_str(), MNT_DETACH) == 0 || errno == EINVAL || errno == ENOENT) {  // gone meanwhile
      LogWarn("the connection to %s was aborted: detached the dead mount", dead.c_str());
    } else {
      LogError("the connection to %s was aborted and detaching the dead mount failed: %s: run umount -l %s",
               dead.c_str(), strerror(errno), dead.c_str());
      rc = 1;
    }
  }
  // Not mounted any more (after a signal: unmounted just above).
  UnmarkServed(fs->device());
  // A poller may still be inside the Wake() of a worker's TaskWork for the
  // last completion it ran: the workers' TaskWorks outlive the pollers.
  fs.reset();
  pool.reset();
  if (rc == 0) LogInfo("unmounted %s", mountpoint.c_str());
  return rc;
}

}  // namespace deferfs
