// The FUSE low-level operation table for a Filesystem (the session's userdata).
// Each callback translates one request, calls Filesystem, and replies exactly once.
#pragma once

#include <fuse_lowlevel.h>

namespace deferfs {

const fuse_lowlevel_ops& FuseOps();

}  // namespace deferfs
