// deferfs fsck: checks an unmounted deferfs offline (fs/fsck.cc) and, with
// --repair, fixes what can be fixed safely. Holds the backing device's flock
// throughout, so it never runs against a mounted filesystem, nor a mount
// against it.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "backend/device.h"
#include "backend/metadata.h"
#include "backend/superblock.h"
#include "fs/fsck.h"
#include "mount/backing_lock.h"
#include "mount/commands.h"

namespace deferfs {
namespace {

std::string Count(uint64_t n, const char* one, const char* many) {
  return std::to_string(n) + " " + (n == 1 ? one : many);
}

void PrintLines(const char* prefix, const std::vector<std::string>& lines) {
  for (const std::string& l : lines) std::printf("%s%s\n", prefix, l.c_str());
}

}  // namespace

int FsckCommand(const FsckArgs& args) {
  const std::string& backing = args.backing;
  std::string meta_dir = args.meta;
  FsckOptions opt;
  opt.repair = args.repair;

  std::unique_ptr<Device> dev;
  Status s = Device::Open(backing, &dev);
  if (s.ok()) s = LockBacking(dev.get(), backing);
  if (!s.ok()) return Fail(s.message());
  if (dev->size() < kSuperblockBytes) {
    return Fail(backing + " is too small to hold a deferfs: it is not a deferfs filesystem");
  }
  AlignedBuffer sbuf(kSuperblockBytes, std::max<uint32_t>(dev->dio_align(), 4096));
  Superblock sb;
  s = dev->ReadSync(0, sbuf.data(), kSuperblockBytes);
  if (!s.ok()) return Fail(s.message());
  s = DecodeSuperblock(sbuf.bytes(), backing, &sb);
  if (!s.ok()) {
    // The decoder's advice for a bad checksum is to run fsck, which cannot
    // rebuild a superblock.
    if (s.message().find("fsck") == std::string::npos) return Fail(s.message());
    return Fail(backing + " has a corrupt deferfs superblock (checksum mismatch), which fsck cannot rebuild: "
                          "restore the device or reformat it with 'deferfs mkfs --force'");
  }
  if (meta_dir.empty()) meta_dir = DefaultMetaDir(backing, dev->is_block_device(), UuidToString(sb.uuid));
  std::unique_ptr<MetaStore> meta;
  s = MetaStore::OpenForFsck(meta_dir, sb.uuid, &meta);
  if (!s.ok()) {
    // The store's advice names mount's option; fsck spells it --meta.
    std::string msg = s.message();
    if (size_t at = msg.find("-o meta=DIR"); at != std::string::npos) msg.replace(at, 11, "--meta DIR");
    return Fail(msg);
  }

  std::printf("deferfs fsck: %s: uuid %s, %llu MiB, metadata in %s\n", backing.c_str(), UuidToString(sb.uuid).c_str(),
              static_cast<unsigned long long>(sb.device_bytes >> 20), meta_dir.c_str());
  std::fflush(stdout);
  if (isatty(STDERR_FILENO)) {
    opt.progress = [](const std::string& phase) { std::fprintf(stderr, "deferfs fsck: %s...\n", phase.c_str()); };
  }
  FsckReport report;
  s = Fsck(sb, dev->size(), meta.get(), opt, &report);
  if (!s.ok()) {
    // Fsck reports undecodable records instead of stopping at them; should
    // one still stop it, the store's advice would send the user back here.
    std::string msg = s.message();
    if (size_t at = msg.find(": run 'deferfs fsck'"); at != std::string::npos) {
      msg = msg.substr(0, at) + ": fsck cannot decode it; restore the metadata from a backup or reformat";
    }
    return Fail(msg);
  }

  PrintLines("error: ", report.errors);
  PrintLines("note: ", report.notes);
  PrintLines("repaired: ", report.repairs);
  std::printf("deferfs fsck: %s (%s), %s, %s; %llu of %llu blocks used, %llu free\n",
              Count(report.inodes, "inode", "inodes").c_str(),
              Count(report.directories, "directory", "directories").c_str(),
              Count(report.entries, "entry", "entries").c_str(), Count(report.extents, "extent", "extents").c_str(),
              static_cast<unsigned long long>(report.used_blocks), static_cast<unsigned long long>(report.total_blocks),
              static_cast<unsigned long long>(report.free_blocks));
  const uint64_t found = report.errors.size();
  if (report.clean()) {
    if (found == 0) {
      std::printf("deferfs fsck: %s is clean\n", backing.c_str());
    } else {
      std::printf("deferfs fsck: %s: %s found, all repaired\n", backing.c_str(),
                  Count(found, "error", "errors").c_str());
    }
    return 0;
  }
  std::fflush(stdout);
  const std::string n = Count(report.remaining, "error", "errors");
  if (opt.repair || report.repairable == 0) {
    return Fail(backing + ": found " + n + " that --repair cannot fix safely (see above): restore the metadata from "
                "a backup or reformat");
  }
  return Fail(backing + ": found " + n + " (see above), " + std::to_string(report.repairable) +
              " of them repairable: run 'deferfs fsck --repair " + backing + "'");
}

}  // namespace deferfs
