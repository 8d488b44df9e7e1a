#include "mount/backing_lock.h"

#include <cerrno>
#include <thread>

#include "mount/mountinfo.h"

namespace deferfs {

Status LockBacking(Device* dev, const std::string& backing, std::chrono::milliseconds patience) {
  const auto deadline = std::chrono::steady_clock::now() + patience;
  for (;;) {
    Status s = dev->LockExclusive();
    if (s.ok() || s.err() != EBUSY) return s;
    if (std::string at = DeferfsMountOf(backing); !at.empty()) {
      return Status::Error(EBUSY, backing + " is mounted at " + at + ": unmount it first");
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return Status::Error(EBUSY, backing + " is in use by another deferfs process (an fsck or mkfs, or a " +
                                      "daemon still finishing its unmount): wait for it to exit ('fuser -v " +
                                      backing + "' shows it)");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace deferfs
