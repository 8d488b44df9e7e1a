// Fault injection, for tests only: with the mount option `fault_inject` a
// poller fails the bios whose payload carries a tag, as a failing device
// would. Tests pick the requests to fail by what they write. Pure; thread-safe.
#pragma once

#include <cstdint>

#include "backend/bio.h"

namespace deferfs {

// A tag is the first bytes (its NUL included) of a 4 KiB block of a bio's
// buffer. A -WRITE tag fails the write that carries it, before it reaches the
// device (nothing is transferred). A -READ tag is written like any data and
// fails every later read of that block, after the device read. EIO completes
// with -EIO, SHORT with half the bio's length (a short completion).
inline constexpr char kFaultEioWrite[] = "DEFERFS-FAULT:EIO-WRITE";
inline constexpr char kFaultShortWrite[] = "DEFERFS-FAULT:SHORT-WRITE";
inline constexpr char kFaultEioRead[] = "DEFERFS-FAULT:EIO-READ";
inline constexpr char kFaultShortRead[] = "DEFERFS-FAULT:SHORT-READ";
inline constexpr uint32_t kFaultBlockBytes = 4096;

// For a read or write bio holding a tag of its direction in any of its 4 KiB
// blocks: true, with *result set to what the device should report. Reads
// must be checked once their data is in the buffer, writes before submission.
bool InjectedFault(const Bio& bio, int32_t* result);

}  // namespace deferfs
