// /proc/self/mountinfo, read for what the commands need from it: which FUSE
// connection, and which backing's deferfs, is mounted where. Stateless; any
// thread.
#pragma once

#include <string>

namespace deferfs {

// The device ("0:N", one per FUSE connection) of the topmost FUSE mount on
// `mountpoint`, or "" if there is none. `mountpoint` must be canonical (as
// mountinfo writes it); resolve it before mounting, as resolving it after
// would ask the new mount itself.
std::string FuseDeviceAt(const std::string& mountpoint);

// The source of the mount of `device`, or "" if there is none.
std::string MountSourceOf(const std::string& device);

// Where the mount of `device` with `source` is attached, or "" if it no
// longer is. The device alone does not name a mount for long: once a FUSE
// mount is gone, the next FUSE mount may get its number.
std::string MountPathOf(const std::string& device, const std::string& source);

// The device of the topmost mount of any type on `path` (the only one an
// unmount by path reaches), or "" if none or if mountinfo leaves it open.
std::string TopDeviceAt(const std::string& path);

// Where a deferfs serving `backing` is mounted, as this mount namespace
// sees it, or "" if nowhere (or under a source given with -o fsname=).
std::string DeferfsMountOf(const std::string& backing);

}  // namespace deferfs
