// /proc/self/mountinfo, read for the one thing the mount command needs from
// it: which FUSE connection is mounted where. Stateless; any thread.
#pragma once

#include <string>

namespace deferfs {

// The device ("0:N", one per FUSE connection) of the topmost FUSE mount on
// `mountpoint`, or "" if there is none. `mountpoint` must be canonical (as
// mountinfo writes it); resolve it before mounting, as resolving it after
// would ask the new mount itself.
std::string FuseDeviceAt(const std::string& mountpoint);

// Where the mount of `device` is attached, or "" if it no longer is.
std::string MountPathOf(const std::string& device);

}  // namespace deferfs
