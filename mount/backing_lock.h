// The backing device's lock as the commands take it: mkfs, mount and fsck
// each hold it for as long as they use the device, so one runs at a time.
// Stateless; any thread.
#pragma once

#include <chrono>
#include <string>

#include "backend/device.h"
#include "backend/status.h"

namespace deferfs {

// How long LockBacking waits for a holder that is not a mounted deferfs.
inline constexpr std::chrono::seconds kBackingLockPatience{10};

// Locks `dev`, opened from `backing`. Held by a mounted deferfs: refused at
// once, naming the mountpoint. Held otherwise, the holder is a daemon still
// finishing after its unmount (umount returns before the daemon has closed
// its metadata), an fsck or an mkfs: waits up to `patience` for it, so that
// `umount && mount` works.
Status LockBacking(Device* dev, const std::string& backing,
                   std::chrono::milliseconds patience = kBackingLockPatience);

}  // namespace deferfs
