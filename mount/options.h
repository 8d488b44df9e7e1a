// MountOptions: everything `deferfs mount -o ...` accepts. ParseMountOptions
// validates every value and splits deferfs's own options from the FUSE/VFS
// ones passed through to libfuse. Pure; thread-compatible.
#pragma once

#include <string>
#include <vector>

#include "backend/log.h"
#include "backend/status.h"
#include "fs/completion_mode.h"

namespace deferfs {

// FUSE workers by default: one per two CPUs the calling process may run on
// (so call it after cpus= confined the daemon). More workers than that only
// add context switches between them, the pollers and the application.
unsigned DefaultWorkers();

// How requests travel between the kernel and the workers.
enum class FuseTransport {
  kDev,    // read(2) and writev(2) on /dev/fuse, a system call per request each way
  kUring,  // FUSE over io_uring (Linux 6.14+, fuse enable_uring=Y), or the mount fails
};
std::string_view FuseTransportName(FuseTransport t);

struct MountOptions {
  std::string meta_dir;  // empty: derived from the backing path
  CompletionMode completion = CompletionMode::kAuto;
  unsigned workers = 0;  // 0 until the mount resolves it: DefaultWorkers()
  unsigned pollers = 1;
  unsigned cthreads = 1;
  unsigned ring_depth = 256;
  unsigned commit = 5;  // seconds between background metadata commits
  FuseTransport transport = FuseTransport::kDev;
  unsigned uring_depth = 0;  // FUSE ring entries per kernel queue (per CPU); 0: derived
  bool read_only = false;
  bool sync = false;     // `sync`: every write O_DSYNC, every change durable on return
  bool dirsync = false;  // `dirsync`: directory changes durable on return
  bool blkdev = false;   // `blkdev`: a fuseblk mount, which needs a block device as the backing
  unsigned blksize = 0;  // `blksize=`: 0 if not given
  unsigned max_read = 0;  // `max_read=`: 0 if not given
  // CPUs every daemon thread may run on (`cpus=0-1:4`); empty: any the
  // mounting process may use. Sorted, no duplicates.
  std::vector<unsigned> cpus;
  bool fault_inject = false;  // testing only: pollers fail tagged bios (backend/fault_inject.h)
  std::string undo_log;       // testing only: the device's undo log (backend/undo_log.h); empty: none
  LogLevel log_level = LogLevel::kInfo;
  // Options for libfuse/the kernel mount (allow_other, ro, fsname=...), in order.
  std::vector<std::string> fuse_opts;

  // "completion=auto,workers=2,..." for the log line that starts a mount.
  std::string Describe() const;
};

// A CPU list as cpus= takes it: {0, 1, 2, 3, 8} -> "0-3:8".
std::string CpuListText(const std::vector<unsigned>& cpus);

// The -o options with their meaning and default, for `deferfs mount --help`.
std::string MountOptionsHelp();

// Parses a comma-separated -o string (may be given several times: call once
// per -o). Errors name the option and the accepted values.
Status ParseMountOptions(const std::string& opts, MountOptions* out);

// What no single -o string can tell: options that need one another. Call
// once, after every -o is parsed.
Status CheckMountOptions(const MountOptions& opts);

}  // namespace deferfs
