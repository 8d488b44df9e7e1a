#include "mount/backing_lock.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>

#include "mount/mountinfo.h"

namespace deferfs {

namespace {

struct flock FirstByte(short type) {
  struct flock l {};
  l.l_type = type;
  l.l_whence = SEEK_SET;
  l.l_start = 0;
  l.l_len = 1;
  return l;
}

// Another open file description holds the served mark.
bool ServedElsewhere(const Device& dev) {
  struct flock l = FirstByte(F_WRLCK);
  return fcntl(dev.fd(), F_OFD_GETLK, &l) == 0 && l.l_type != F_UNLCK;
}

struct CloseDir {
  void operator()(DIR* d) const { closedir(d); }
};
using UniqueDir = std::unique_ptr<DIR, CloseDir>;

// Whether a live process has the file that holds the served mark in its file
// table. A daemon killed by SIGKILL leaves it to the kernel, which closes it
// only once io_uring has torn the dead daemon's rings down in the background
// (they hold the backing as a registered file): until then the mark stands
// with no process, and no mount, behind it. /proc/PID/fdinfo/FD lists the
// locks on each open file ("lock: 2: OFDLCK ADVISORY WRITE -1 fe:00:1234 0
// 0", device numbers in hex); nothing is stat()ed, which could hang on a FUSE
// file. Processes in a PID namespace this one does not see are not found.
bool MarkHolderLives(const Device& dev) {
  struct stat st;
  if (fstat(dev.fd(), &st) != 0) return true;  // cannot tell: take the mark at its word
  char inode[64];
  std::snprintf(inode, sizeof(inode), " %02x:%02x:%llu ", major(st.st_dev), minor(st.st_dev),
                static_cast<unsigned long long>(st.st_ino));
  UniqueDir proc(opendir("/proc"));
  if (!proc) return true;
  const std::string self = std::to_string(getpid());
  while (const dirent* p = readdir(proc.get())) {
    if (p->d_name[0] < '1' || p->d_name[0] > '9' || self == p->d_name) continue;
    UniqueDir fds(opendir(("/proc/" + std::string(p->d_name) + "/fdinfo").c_str()));
    if (!fds) continue;  // exited meanwhile, or not ours to look into
    while (const dirent* f = readdir(fds.get())) {
      if (f->d_name[0] == '.') continue;
      UniqueFd info(openat(dirfd(fds.get()), f->d_name, O_RDONLY | O_CLOEXEC));
      char buf[4096];
      const ssize_t n = info.valid() ? read(info.get(), buf, sizeof(buf) - 1) : -1;
      if (n <= 0) continue;
      buf[n] = '\0';
      for (const char* l = std::strstr(buf, "OFDLCK"); l != nullptr; l = std::strstr(l + 1, "OFDLCK")) {
        const char* eol = std::strchr(l, '\n');
        const char* at = std::strstr(l, inode);
        if (at != nullptr && (eol == nullptr || at < eol)) return true;
      }
    }
  }
  return false;
}

}  // namespace

Status LockBacking(Device* dev, const std::string& backing, std::chrono::milliseconds patience) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + patience;
  bool told = false;
  for (;;) {
    Status s = dev->LockExclusive();
    if (s.ok() || s.err() != EBUSY) return s;
    // The served mark with no mount here and no live process behind it is a
    // killed daemon's, about to go with its last file: waited for. Still
    // there at the deadline, it is taken for a mount out of sight. A live
    // holder gets a moment's grace: a daemon the kernel just unmounted holds
    // its mark until it notices.
    const bool served = ServedElsewhere(*dev);
    const auto now = std::chrono::steady_clock::now();
    const bool past = now >= deadline;
    if (served) {
      const std::string at = DeferfsMountOf(backing);
      if (!at.empty()) return Status::Error(EBUSY, backing + " is mounted at " + at + ": unmount it first");
      if (past || (now - start >= kServedGrace && MarkHolderLives(*dev))) {
        return Status::Error(EBUSY, backing + " is mounted (where this process cannot see it): unmount it first");
      }
    }
    if (past) {
      return Status::Error(EBUSY, backing + " is in use by another process (a deferfs fsck or mkfs, or a " +
                                      "daemon still finishing its unmount): wait for it to exit ('fuser -v " +
                                      backing + "' shows it)");
    }
    // A daemon finishing its unmount lets go within a fraction of a second;
    // a longer wait is worth a line, so that the command is not taken for hung.
    if (!told && std::chrono::steady_clock::now() - start >= kBackingLockNotice) {
      std::fprintf(stderr, "deferfs: %s is in use by another process; waiting up to %lld s\n",
                   backing.c_str(), static_cast<long long>(std::chrono::ceil<std::chrono::seconds>(patience).count()));
      told = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Status MarkServed(const Device& dev) {
  struct flock l = FirstByte(F_WRLCK);
  if (fcntl(dev.fd(), F_OFD_SETLK, &l) != 0) {
    return Status::Error(errno, std::string("cannot mark the backing as mounted: ") + strerror(errno));
  }
  return Status::Ok();
}

void UnmarkServed(const Device& dev) {
  struct flock l = FirstByte(F_UNLCK);
  fcntl(dev.fd(), F_OFD_SETLK, &l);
}

}  // namespace deferfs
