#include "mount/backing_lock.h"

#include <fcntl.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
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

}  // namespace

Status LockBacking(Device* dev, const std::string& backing, std::chrono::milliseconds patience) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + patience;
  bool told = false;
  for (;;) {
    Status s = dev->LockExclusive();
    if (s.ok() || s.err() != EBUSY) return s;
    if (ServedElsewhere(*dev)) {
      const std::string at = DeferfsMountOf(backing);
      return Status::Error(EBUSY, backing + (at.empty() ? " is mounted (where this process cannot see it)"
                                                        : " is mounted at " + at) +
                                      ": unmount it first");
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return Status::Error(EBUSY, backing + " is in use by another deferfs process (an fsck or mkfs, or a " +
                                      "daemon still finishing its unmount): wait for it to exit ('fuser -v " +
                                      backing + "' shows it)");
    }
    // A daemon finishing its unmount lets go within a fraction of a second;
    // a longer wait is worth a line, so that the command is not taken for hung.
    if (!told && std::chrono::steady_clock::now() - start >= kBackingLockNotice) {
      std::fprintf(stderr, "deferfs: %s is in use by another deferfs process; waiting up to %lld s\n",
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
