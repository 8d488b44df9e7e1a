// The backing device's lock as the commands take it: mkfs, mount and fsck
// each hold it for as long as they use the device, so one runs at a time.
// Stateless; any thread.
#pragma once

#include <chrono>
#include <string>

#include "backend/device.h"
#include "backend/status.h"

namespace deferfs {

// How long LockBacking waits for a holder that is not a mounted deferfs,
// and after how long of it it says so on stderr (one line).
inline constexpr std::chrono::seconds kBackingLockPatience{10};
inline constexpr std::chrono::seconds kBackingLockNotice{1};
// How long a served mark that no visible mount explains is waited for before
// it counts as a mount out of sight: below the notice, so the refusal stays
// one line.
inline constexpr std::chrono::milliseconds kServedGrace{500};

// Locks `dev`, opened from `backing`; blocks up to `patience`. Held by a
// mounted deferfs (see MarkServed): refused, naming the mountpoint when this
// mount namespace shows it (at once), else after kServedGrace. Held otherwise, the holder is a daemon
// still finishing after its unmount (umount returns before the daemon has
// closed its metadata), an fsck or an mkfs: waited for, so that
// `umount && mount` works. So is a mark that neither a mount here nor a live
// process stands behind: a daemon killed by SIGKILL leaves its file, mark and
// all, to the kernel for a moment; still there at the deadline, it is
// refused as a mount out of sight.
Status LockBacking(Device* dev, const std::string& backing,
                   std::chrono::milliseconds patience = kBackingLockPatience);

// The daemon, from its mount until its unmount: marks the locked `dev` as
// served, by an OFD lock on its first byte (apart from the flock), seen in
// every mount namespace. Best effort: unmarked, others wait, then refuse.
Status MarkServed(const Device& dev);
void UnmarkServed(const Device& dev);

}  // namespace deferfs
