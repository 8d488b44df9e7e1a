// Fsck: the offline consistency check of one deferfs metadata store against
// its superblock, and the repair of what can be fixed without guessing.
// Not thread-safe: the caller holds the device lock, so no mount uses the store.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "backend/metadata.h"
#include "backend/status.h"
#include "backend/superblock.h"

namespace deferfs {

struct FsckOptions {
  // Fix leaked inodes and keys, orphans, link counts, dangling or mistyped
  // entries, readdir cookies, parents and the inode counter; delete records
  // too corrupt to decode and keys of no record's shape, but rebuild an
  // unreadable inode that has extents as a regular file; reconnect
  // unreachable inodes under /lost+found.
  // All in one synced MetaBatch; nothing at all without a root directory.
  bool repair = false;
  // Called as each phase starts (a progress line); may be empty.
  std::function<void(const std::string& phase)> progress;
};

struct FsckReport {
  std::vector<std::string> errors;   // one precise line per inconsistency found
  std::vector<std::string> notes;    // not errors: orphans the next mount frees
  std::vector<std::string> repairs;  // what repair changed, one line each
  uint64_t repairable = 0;           // errors repair fixes (or fixed)
  uint64_t remaining = 0;            // errors still in the store afterwards

  uint64_t inodes = 0;
  uint64_t directories = 0;
  uint64_t entries = 0;
  uint64_t extents = 0;
  uint64_t total_blocks = 0;  // the data area
  uint64_t used_blocks = 0;   // as the mount's free-space rebuild sees them
  uint64_t free_blocks = 0;

  bool clean() const { return remaining == 0; }
};

// Checks `meta` (opened for sb.uuid) against `sb` on a device of
// `device_bytes`. Problems found go into *report; a non-ok Status means the
// check itself could not run, or the repair could not be committed.
Status Fsck(const Superblock& sb, uint64_t device_bytes, MetaStore* meta, const FsckOptions& opt,
            FsckReport* report);

}  // namespace deferfs
