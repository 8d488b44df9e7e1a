#include "mount/options.h"

#include <fuse_opt.h>
#include <unistd.h>

#include <sched.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <string_view>

namespace deferfs {
namespace {

// Options libfuse and the kernel understand; passed through unchanged.
constexpr std::string_view kFuseFlags[] = {
    "allow_other", "allow_root", "default_permissions", "auto_unmount", "ro", "rw", "suid", "nosuid",
    "dev", "nodev", "exec", "noexec", "atime", "noatime", "relatime", "norelatime", "strictatime",
    "sync", "async", "dirsync", "blkdev",
};
constexpr std::string_view kFuseValued[] = {"fsname=", "subtype=", "max_read=", "blksize="};
// fstab/mount(8) bookkeeping that is not a filesystem option.
constexpr std::string_view kIgnored[] = {"defaults", "auto",  "noauto", "nofail", "_netdev",
                                         "user",     "users", "nouser", "owner",  "group"};

struct NumberOpt {
  std::string_view key;
  unsigned MountOptions::*field;
  unsigned min, max;
};
constexpr NumberOpt kNumbers[] = {
    {"workers", &MountOptions::workers, 1, 64},
    {"pollers", &MountOptions::pollers, 1, 16},
    {"cthreads", &MountOptions::cthreads, 1, 64},
    {"ring_depth", &MountOptions::ring_depth, 8, 4096},
    {"commit", &MountOptions::commit, 1, 300},
    {"uring_depth", &MountOptions::uring_depth, 1, 256},
};

struct ParseState {
  MountOptions* out;
  Status status;
};

Status BadValue(std::string_view opt, const std::string& want) {
  return Status::Invalid("bad mount option '" + std::string(opt) + "': " + want);
}

bool ParseUnsigned(std::string_view s, unsigned* v) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *v);
  return !s.empty() && ec == std::errc() && p == s.data() + s.size();
}

// "0-1:4" -> {0, 1, 4}. ':' joins the ranges: ',' already separates options.
bool ParseCpuList(std::string_view list, std::vector<unsigned>* cpus) {
  cpus->clear();
  while (!list.empty()) {
    const size_t colon = list.find(':');
    const std::string_view range = list.substr(0, colon);
    list = colon == std::string_view::npos ? std::string_view() : list.substr(colon + 1);
    if (colon != std::string_view::npos && list.empty()) return false;  // a trailing ':'
    const size_t dash = range.find('-');
    unsigned first, last;
    if (!ParseUnsigned(range.substr(0, dash), &first)) return false;
    last = first;
    if (dash != std::string_view::npos && !ParseUnsigned(range.substr(dash + 1), &last)) return false;
    if (last < first || last >= CPU_SETSIZE) return false;
    for (unsigned c = first; c <= last; ++c) cpus->push_back(c);
  }
  std::sort(cpus->begin(), cpus->end());
  cpus->erase(std::unique(cpus->begin(), cpus->end()), cpus->end());
  return !cpus->empty();
}

Status ParseOne(std::string_view opt, MountOptions* o) {
  size_t eq = opt.find('=');
  std::string_view key = opt.substr(0, eq);
  std::string_view val = eq == std::string_view::npos ? std::string_view() : opt.substr(eq + 1);
  bool has_val = eq != std::string_view::npos;

  for (const NumberOpt& n : kNumbers) {
    if (key != n.key) continue;
    unsigned v = 0;
    std::string want = std::string(n.key) + " takes a whole number from " + std::to_string(n.min) + " to " +
                       std::to_string(n.max);
    if (!has_val || !ParseUnsigned(val, &v) || v < n.min || v > n.max) {
      return BadValue(opt, want);
    }
    if (key == "ring_depth" && (v & (v - 1)) != 0) return BadValue(opt, "ring_depth must be a power of two");
    o->*n.field = v;
    return Status::Ok();
  }
  if (key == "completion") {
    auto m = ParseCompletionMode(val);
    if (!has_val || !m) return BadValue(opt, "completion is one of " + std::string(kCompletionModeNames));
    o->completion = *m;
    return Status::Ok();
  }
  if (key == "transport") {
    for (auto t : {FuseTransport::kDev, FuseTransport::kUring}) {
      if (has_val && val == FuseTransportName(t)) {
        o->transport = t;
        return Status::Ok();
      }
    }
    return BadValue(opt, "transport is dev or uring");
  }
  if (key == "cpus") {
    if (!has_val || !ParseCpuList(val, &o->cpus)) {
      return BadValue(opt, "cpus takes CPU numbers (0-" + std::to_string(CPU_SETSIZE - 1) +
                               ") and ranges joined by ':', e.g. cpus=1 or cpus=0-3:8");
    }
    return Status::Ok();
  }
  if (key == "meta") {
    if (!has_val || val.empty()) return BadValue(opt, "meta takes the metadata directory's path");
    o->meta_dir = val;
    return Status::Ok();
  }
  for (std::string_view f : kIgnored) {
    if (opt == f) return Status::Ok();
  }
  if (opt == "remount") return Status::Invalid("remounting a deferfs is not supported: unmount and mount again");
  if (opt == "fault_inject") {
    o->fault_inject = true;
    return Status::Ok();
  }
  if (key == "undo_log") {
    if (!has_val || val.empty()) return BadValue(opt, "undo_log takes the path of the log file to write");
    o->undo_log = val;
    return Status::Ok();
  }
  if (key == "loglevel") {
    if (!has_val || !ParseLogLevel(std::string(val).c_str(), &o->log_level)) {
      return BadValue(opt, "loglevel is one of error, warn, info, debug");
    }
    return Status::Ok();
  }
  if (opt.starts_with("x-") || opt.starts_with("comment=") || opt.starts_with("user=")) return Status::Ok();
  for (std::string_view f : kFuseFlags) {
    if (opt != f) continue;
    if (opt == "ro") o->read_only = true;
    if (opt == "rw") o->read_only = false;
    if (opt == "sync") o->sync = true;
    if (opt == "async") o->sync = false;
    if (opt == "dirsync") o->dirsync = true;
    if (opt == "blkdev") o->blkdev = true;
    if (opt != "default_permissions") o->fuse_opts.emplace_back(opt);  // always on: see mount
    return Status::Ok();
  }
  // Numbers checked here: libfuse and the kernel would refuse them only
  // after the daemon has opened everything, with lines of their own.
  for (std::string_view f : kFuseValued) {
    if (!opt.starts_with(f) || opt.size() == f.size()) continue;
    unsigned v = 0;
    if (f == "max_read=") {
      if (!ParseUnsigned(val, &v) || v == 0) return BadValue(opt, "max_read takes a whole number of bytes, at least 1");
      o->max_read = v;
    }
    if (f == "blksize=") {
      if (!ParseUnsigned(val, &v) || v < 512 || v > 4096 || (v & (v - 1)) != 0) {
        return BadValue(opt, "blksize takes a power of two from 512 to 4096");
      }
      o->blksize = v;
    }
    o->fuse_opts.emplace_back(opt);
    return Status::Ok();
  }
  return Status::Invalid("unknown mount option '" + std::string(opt) +
                         "': see 'deferfs mount --help' for the accepted options");
}

// libfuse's option parser splits the string (honouring its \, escapes) and
// hands us each option.
int Proc(void* data, const char* arg, int key, fuse_args*) {
  auto* st = static_cast<ParseState*>(data);
  if (key != FUSE_OPT_KEY_OPT) return 1;
  if (st->status.ok()) st->status = ParseOne(arg, st->out);
  return st->status.ok() ? 0 : -1;
}

}  // namespace

Status ParseMountOptions(const std::string& opts, MountOptions* out) {
  const char* argv[] = {"deferfs", "-o", opts.c_str()};
  fuse_args args = FUSE_ARGS_INIT(3, const_cast<char**>(argv));
  const fuse_opt end = FUSE_OPT_END;
  ParseState st{out, Status::Ok()};
  int rc = fuse_opt_parse(&args, &st, &end, Proc);
  fuse_opt_free_args(&args);
  if (!st.status.ok()) return st.status;
  if (rc != 0) return Status::Invalid("cannot parse mount options '" + opts + "'");
  return Status::Ok();
}

Status CheckMountOptions(const MountOptions& o) {
  if (o.blksize != 0 && !o.blkdev) {
    return Status::Invalid("bad mount option 'blksize=" + std::to_string(o.blksize) +
                           "': the kernel takes it only with blkdev: add blkdev, or leave blksize out");
  }
  return Status::Ok();
}

std::string_view FuseTransportName(FuseTransport t) {
  switch (t) {
    case FuseTransport::kUring: return "uring";
    case FuseTransport::kDev: return "dev";
  }
  return "?";
}

unsigned DefaultWorkers() {
  // The CPUs this process may run on: cpus=, taskset and cpusets count.
  cpu_set_t set;
  long cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : sysconf(_SC_NPROCESSORS_ONLN);
  return cpus >= 4 ? static_cast<unsigned>(cpus / 2) : 1;
}

std::string CpuListText(const std::vector<unsigned>& cpus) {
  std::string out;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    out += (out.empty() ? "" : ":") + std::to_string(cpus[i]) + (j > i ? "-" + std::to_string(cpus[j]) : "");
    i = j + 1;
  }
  return out;
}

std::string MountOptions::Describe() const {
  const std::string cpu_list = cpus.empty() ? "" : ",cpus=" + CpuListText(cpus);
  return "completion=" + std::string(CompletionModeName(completion)) + ",workers=" + std::to_string(workers) +
         ",pollers=" + std::to_string(pollers) + ",cthreads=" + std::to_string(cthreads) +
         ",ring_depth=" + std::to_string(ring_depth) + ",commit=" + std::to_string(commit) +
         ",transport=" + std::string(FuseTransportName(transport)) +
         (uring_depth ? ",uring_depth=" + std::to_string(uring_depth) : std::string()) +
         cpu_list + (read_only ? ",ro" : ",rw") +
         ",loglevel=" + LogLevelName(log_level) + (fault_inject ? ",fault_inject" : "") +
         (undo_log.empty() ? "" : ",undo_log=" + undo_log);
}

std::string MountOptionsHelp() {
  return "Mount options (-o, comma-separated, may be repeated):\n"
         "  completion=MODE    who runs async DIO completions: inline|workqueue|defer|auto|sync (default auto)\n"
         "  workers=N          FUSE worker threads, 1-64 (default " + std::to_string(DefaultWorkers()) +
         " here: half the CPUs this process may use; cpus= counts, at least 1)\n"
         "  pollers=N          io_uring poller threads, 1-16 (default 1)\n"
         "  cthreads=N         completion threads for completion=workqueue, 1-64 (default 1)\n"
         "  ring_depth=N       io_uring entries per poller, power of two 8-4096 (default 256)\n"
         "  transport=T        how FUSE requests travel: dev|uring (default dev). dev: read/writev on\n"
         "                     /dev/fuse; uring: FUSE over io_uring (Linux 6.14+, and as root:\n"
         "                     echo Y > /sys/module/fuse/parameters/enable_uring)\n"
         "  uring_depth=N      FUSE ring slots per kernel queue (one per possible CPU), 1-256 (default\n"
         "                     32, fewer beyond 8 possible CPUs); each keeps an IO buffer (1 MiB + 4 KiB)\n"
         "  cpus=LIST          CPUs every daemon thread may run on: numbers and ranges joined by ':'\n"
         "                     (cpus=1, cpus=0-3:8; default: any the scheduler picks)\n"
         "  commit=SECONDS     background metadata commit interval, 1-300 (default 5): the most a\n"
         "                     crash loses of what was not fsync'ed\n"
         "  meta=DIR           metadata directory (default BACKING.meta, /var/lib/deferfs/UUID for a block device)\n"
         "  loglevel=LEVEL     error|warn|info|debug (default info); stderr with -f, else syslog\n"
         "  fault_inject       testing only: fail IO whose data carries a tag of backend/fault_inject.h\n"
         "  undo_log=FILE      testing only: log what each device write overwrites and what each flush,\n"
         "                     FUA write and sync covered, so that a crash test can roll back the rest,\n"
         "                     as a power cut may (backend/undo_log.h; FILE truncated at each mount)\n"
         "  ro, rw             read-only (writes fail with EROFS) or read-write (default rw)\n"
         "  sync, async        sync: every write O_DSYNC, every change durable on return (default async)\n"
         "  dirsync            creates, links, unlinks and renames durable on return\n"
         "  allow_other, allow_root, auto_unmount, nosuid, nodev, noexec, noatime,\n"
         "  fsname=, subtype=, max_read=, blksize=\n"
         "                     standard FUSE/VFS options, passed to libfuse and the kernel\n"
         "                     (blksize=512-4096 only with blkdev, which needs a block device)\n"
         "  default_permissions always on: the kernel checks modes and owners\n"
         "  defaults, auto, noauto, nofail, _netdev, user, users, owner, group, x-*, comment=\n"
         "                     fstab bookkeeping, accepted and ignored\n";
}

}  // namespace deferfs
