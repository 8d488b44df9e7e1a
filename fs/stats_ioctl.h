// The ioctls `deferfs stats` sends to a mount's root directory: the report
// travels through the FUSE connection, so no file appears in the namespace.
#pragma once

#include <sys/ioctl.h>

#include <cstddef>

namespace deferfs {

// The largest size an ioctl number can encode (14 bits).
inline constexpr size_t kStatsIoctlBytes = 16383;
using StatsIoctlBuf = char[kStatsIoctlBytes];

// Fills the buffer with the stats JSON (NUL-terminated).
inline constexpr unsigned kIocStats = _IOR('D', 1, StatsIoctlBuf);
// The same, then restarts counting (root only).
inline constexpr unsigned kIocStatsReset = _IOR('D', 2, StatsIoctlBuf);

}  // namespace deferfs
