// deferfs mkfs: writes a superblock and creates the paired metadata store.
// Order keeps failures harmless: the new store is built in a temporary
// directory, then the superblock is written and flushed, then the store is
// moved into place; only then is a backing file shrunk, an overwritten
// filesystem's metadata removed and --discard done. Before the superblock
// write nothing existing has changed but a backing file's growth.
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <filesystem>

#include "backend/device.h"
#include "backend/metadata.h"
#include "backend/superblock.h"
#include "fs/filesystem.h"
#include "mount/backing_lock.h"
#include "mount/commands.h"
#include "mount/progress.h"

namespace deferfs {
namespace {

bool ParseSize(const std::string& s, uint64_t* out) {
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p == s.data()) return false;
  std::string_view rest(p, s.data() + s.size() - p);
  int shift = 0;
  if (rest == "K" || rest == "k") shift = 10;
  else if (rest == "M" || rest == "m") shift = 20;
  else if (rest == "G" || rest == "g") shift = 30;
  else if (rest == "T" || rest == "t") shift = 40;
  else if (!rest.empty()) return false;
  if (shift && v > (UINT64_MAX >> shift)) return false;
  *out = v << shift;
  return true;
}

void RemoveAll(const std::string& dir) {
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

// Stores are replaced and deleted only under their lock (LockIdle), and
// never in place: a mount that names the directory meanwhile finds a whole
// store there (the old one, locked), or the new one, or nothing, never one
// half deleted.
std::string Aside(const std::string& dir) { return dir + ".mkfs-old"; }

// Makes a rename in `path`'s directory durable.
void SyncParentDir(const std::string& path) {
  std::filesystem::path parent = std::filesystem::path(path).parent_path();
  UniqueFd fd(open(parent.empty() ? "." : parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.valid()) (void)fsync(fd.get());
}

// Puts the new store `fresh` at `dir`. A store there (its LOCK held by the
// caller) trades places with it in one step, so `dir` always names a whole
// store, and is deleted from `fresh`'s name after. Where the file system
// cannot exchange names, the old store is renamed aside first: then, for an
// instant, `dir` names nothing.
Status MoveIntoPlace(const std::string& fresh, const std::string& dir) {
  auto failed = [&](int e) {
    return Status::Error(e, "cannot move the metadata store from " + fresh + " into " + dir + ": " + strerror(e));
  };
  std::string old;  // where the replaced store ends up, if there was one
  if (renameat2(AT_FDCWD, fresh.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) == 0) {
    old = fresh;
  } else {
    // ENOENT: nothing at `dir`. EINVAL, ENOSYS: no exchange here.
    if (errno != ENOENT && errno != EINVAL && errno != ENOSYS) return failed(errno);
    if (errno != ENOENT) {
      old = Aside(dir);
      RemoveAll(old);  // a leftover of a mkfs that died
      if (rename(dir.c_str(), old.c_str()) != 0) {
        if (errno != ENOENT) return failed(errno);
        old.clear();
      }
    }
    if (rename(fresh.c_str(), dir.c_str()) != 0) {
      const int e = errno;
      if (!old.empty() && rename(old.c_str(), dir.c_str()) != 0) {
        return Status::Error(e, "cannot move the metadata store from " + fresh + " into " + dir + " (" +
                                    strerror(e) + "), and the old one is left at " + old);
      }
      return failed(e);
    }
  }
  SyncParentDir(dir);  // the swap before the deletions
  if (!old.empty()) RemoveAll(old);
  return Status::Ok();
}

// Deletes the store in `dir`, whose LOCK the caller holds, from a name
// beside it. (A read-write open that slips in between may leave a directory
// holding only a LOCK file at `dir`.)
Status RemoveStore(const std::string& dir) {
  RemoveAll(Aside(dir));
  std::error_code ec;
  std::filesystem::rename(dir, Aside(dir), ec);
  if (ec) return Status::Error(ec.value(), "cannot remove " + dir + ": " + ec.message());
  SyncParentDir(dir);
  std::filesystem::remove_all(Aside(dir), ec);
  if (ec) return Status::Error(ec.value(), "cannot remove " + Aside(dir) + ": " + ec.message());
  return Status::Ok();
}

// Whether `path` is `dir` or inside it; true when either cannot be resolved
// (the caller then keeps `dir`).
bool Within(const std::string& path, const std::string& dir) {
  std::error_code ec;
  const std::filesystem::path p = std::filesystem::canonical(path, ec);
  if (ec) return true;
  const std::filesystem::path d = std::filesystem::canonical(dir, ec);
  if (ec) return true;
  return std::mismatch(d.begin(), d.end(), p.begin(), p.end()).first == d.end();
}

// Tells the device (BLKDISCARD) or the file system under a backing file
// (hole punching) that every block after the superblock is unused, in 1 GiB
// steps so a large device shows progress.
Status Discard(Device* dev, uint64_t dev_bytes) {
  constexpr uint64_t kStep = 1ull << 30;
  Progress progress(dev->is_block_device() ? "discarding" : "punching holes", dev_bytes);
  for (uint64_t off = kSuperblockBytes; off < dev_bytes; off += kStep) {
    uint64_t len = std::min(kStep, dev_bytes - off);
    int rc;
    if (dev->is_block_device()) {
      uint64_t range[2] = {off, len};
      rc = ioctl(dev->fd(), BLKDISCARD, range);
    } else {
      rc = fallocate(dev->fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                     static_cast<off_t>(len));
    }
    if (rc != 0) return Status::Error(errno, std::string("discarding its blocks failed: ") + strerror(errno));
    progress.Update(off + len);
  }
  return Status::Ok();
}

// The overwritten filesystem's metadata is nobody's now. Only after the new
// filesystem is complete, and only a store paired with the old UUID: a
// directory there that is not its metadata stays. A store it was given with
// meta= elsewhere cannot be known, and stays too. A block device's is only
// named, not removed: a clone or a snapshot of the device has the same UUID
// and shares that directory. One in use (a copy of the old backing file
// mounted with it) stays too.
void ForgetReplacedStore(const Device& dev, const std::string& dir, const Uuid& uuid) {
  if (!MetaStore::CheckPaired(dir, uuid).ok()) return;
  if (dev.is_block_device()) {
    std::printf("deferfs: %s, the metadata of the overwritten filesystem, is left in place: remove it "
                "unless another device (a clone or snapshot) holds that filesystem\n",
                dir.c_str());
    return;
  }
  UniqueFd lock;
  if (Status l = MetaStore::LockIdle(dir, &lock); !l.ok()) {
    std::printf("deferfs: %s, the metadata of the overwritten filesystem, is left in place: %s\n", dir.c_str(),
                l.message().c_str());
    return;
  }
  if (Status r = RemoveStore(dir); !r.ok()) {
    std::fprintf(stderr, "deferfs: the metadata of the overwritten filesystem stays: %s: remove it by hand\n",
                 r.message().c_str());
  } else {
    std::printf("deferfs: removed %s, the metadata of the overwritten filesystem\n", dir.c_str());
  }
}

}  // namespace

int MkfsCommand(const MkfsArgs& args) {
  uint64_t size = 0;
  bool have_size = !args.size.empty();
  if (have_size && !ParseSize(args.size, &size)) {
    return Fail("bad --size '" + args.size + "': give bytes with an optional K, M, G or T suffix");
  }
  const std::string& backing = args.backing;
  const bool force = args.force;
  std::string meta_dir = args.meta;
  if (have_size && size < kMinDeviceBytes) {
    return Fail("--size " + std::to_string(size) + " is too small: a deferfs needs at least " + std::to_string(kMinDeviceBytes >> 20) + "M");
  }

  // A missing backing file is created only when the size is known.
  bool created = false;
  struct stat st;
  if (stat(backing.c_str(), &st) != 0) {
    if (errno != ENOENT) return Fail("cannot stat " + backing + ": " + strerror(errno));
    if (!have_size) return Fail(backing + " does not exist: pass --size SIZE to create it");
    UniqueFd fd(open(backing.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (!fd.valid()) return Fail("cannot create " + backing + ": " + strerror(errno));
    const bool beyond_off_t = size > static_cast<uint64_t>(INT64_MAX);
    if (beyond_off_t || ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
      const int e = beyond_off_t ? EFBIG : errno;
      unlink(backing.c_str());
      if (e == EFBIG || e == EINVAL) {
        return Fail("--size " + args.size + " is larger than a file on this file system can be: pass a smaller --size");
      }
      return Fail("cannot size " + backing + ": " + strerror(e));
    }
    created = true;
  }
  auto undo_create = [&] {
    if (created) unlink(backing.c_str());
  };

  std::unique_ptr<Device> dev;
  Status s = Device::Open(backing, &dev);
  if (s.ok()) s = LockBacking(dev.get(), backing);
  if (!s.ok()) {
    undo_create();
    return Fail(s.message());
  }
  AlignedBuffer sbuf(kSuperblockBytes, std::max<uint32_t>(dev->dio_align(), 4096));
  // The metadata directory of the deferfs being overwritten, where it is
  // found by default; "" if none (or its superblock no longer says which).
  std::string replaced_meta;
  Uuid replaced_uuid{};
  if (!created) {
    s = dev->ReadSync(0, sbuf.data(), kSuperblockBytes);
    if (!s.ok()) return Fail(s.message());
    if (HasSuperblockMagic(sbuf.bytes()) && !force) {
      return Fail(backing + " already holds a deferfs filesystem: pass --force to overwrite it");
    }
    if (Superblock old; HasSuperblockMagic(sbuf.bytes()) && DecodeSuperblock(sbuf.bytes(), backing, &old).ok()) {
      replaced_uuid = old.uuid;
      replaced_meta = DefaultMetaDir(backing, dev->is_block_device(), UuidToString(old.uuid));
    }
  }
  uint64_t dev_bytes = have_size ? size : dev->size();
  if (have_size && dev->is_block_device() && size > dev->size()) {
    return Fail("--size is larger than the block device " + backing + " (" + std::to_string(dev->size()) + " bytes)");
  }
  dev_bytes -= dev_bytes % kBlockSize;
  if (dev_bytes < kMinDeviceBytes) {
    undo_create();
    return Fail(backing + " is too small (" + std::to_string(dev_bytes) + " bytes): a deferfs needs at least " +
                std::to_string(kMinDeviceBytes >> 20) + "M; pass --size to grow a backing file");
  }

  Superblock sb;
  sb.uuid = NewUuid();
  sb.device_bytes = dev_bytes;
  sb.created_ns = NowNs();
  if (meta_dir.empty()) meta_dir = DefaultMetaDir(backing, dev->is_block_device(), UuidToString(sb.uuid));
  // One spelling: the names made beside it (.mkfs-tmp) must not fall inside
  // it, as they would after "meta/".
  if (std::filesystem::path p = std::filesystem::path(meta_dir).lexically_normal();
      !p.has_filename() && p.has_relative_path()) {
    meta_dir = p.parent_path().string();
  }
  if (const std::string last = std::filesystem::path(meta_dir).lexically_normal().filename(); last == "." || last == "..") {
    undo_create();
    return Fail("--meta " + meta_dir + " names a directory by . or ..: pass its path");
  }
  std::error_code ec;
  UniqueFd meta_lock;  // the replaced store's, see below
  if (std::filesystem::exists(meta_dir, ec)) {
    if (!force) {
      undo_create();
      return Fail("metadata directory " + meta_dir + " already exists: pass --force to replace it, or --meta DIR");
    }
    // --force replaces metadata, nothing else that a mistyped --meta names.
    // A store in use is refused (before it is even opened), and the lock
    // taken to find out is held until the new store has replaced it: no
    // mount starts on it meanwhile.
    std::string refusal, advice = "remove it first";
    const bool empty = std::filesystem::is_directory(meta_dir, ec) && std::filesystem::is_empty(meta_dir, ec);
    if (ec) {
      refusal = "cannot look into " + meta_dir + " (" + ec.message() + ")";
    } else if (Status l = empty ? Status::Ok() : MetaStore::LockIdle(meta_dir, &meta_lock); !l.ok()) {
      refusal = l.message();
      if (l.err() == EBUSY) advice = "unmount it (or let fsck finish) first";
    } else if (!empty && !MetaStore::IsStore(meta_dir)) {
      refusal = meta_dir + " exists and is not deferfs metadata";
    }
    if (!refusal.empty()) {
      undo_create();
      return Fail(refusal + ", so --force does not replace it: pass another --meta DIR, or " + advice);
    }
  }
  std::filesystem::path meta_path(meta_dir);
  if (meta_path.has_parent_path()) std::filesystem::create_directories(meta_path.parent_path(), ec);
  std::string tmp = meta_dir + ".mkfs-tmp";
  RemoveAll(tmp);
  s = MetaStore::Create(tmp, sb.uuid, getuid(), getgid());
  if (!s.ok()) {
    RemoveAll(tmp);
    undo_create();
    return Fail(s.message());
  }

  // A backing file grows before the superblock that counts its new blocks;
  // it shrinks, like --discard, only once the old filesystem is gone: before
  // the superblock write a failure or a ^C must leave that one whole.
  const bool resize = have_size && !created && !dev->is_block_device();
  if (resize && size > dev->size() && ftruncate(dev->fd(), static_cast<off_t>(size)) != 0) {
    RemoveAll(tmp);
    return Fail("cannot grow " + backing + ": " + strerror(errno));
  }
  EncodeSuperblock(sb, sbuf.bytes());
  s = dev->WriteSync(0, sbuf.data(), kSuperblockBytes);
  if (s.ok()) s = dev->FlushSync();
  if (!s.ok()) {
    RemoveAll(tmp);
    undo_create();
    return Fail(s.message());
  }
  s = MoveIntoPlace(tmp, meta_dir);
  if (!s.ok()) return Fail(s.message());
  meta_lock.Reset();

  // From here on the new filesystem is whole: what fails now leaves it
  // usable, and says so.
  std::printf("deferfs: formatted %s: %llu MiB, uuid %s, metadata in %s\n", backing.c_str(),
              static_cast<unsigned long long>(dev_bytes >> 20), UuidToString(sb.uuid).c_str(), meta_dir.c_str());
  std::fflush(stdout);
  if (!replaced_meta.empty() && !Within(meta_dir, replaced_meta)) ForgetReplacedStore(*dev, replaced_meta, replaced_uuid);
  if (resize && size < dev->size() && ftruncate(dev->fd(), static_cast<off_t>(size)) != 0) {
    return Fail("formatted " + backing + ", but cannot shrink it to --size: " + strerror(errno) +
                ": it is usable as it is");
  }
  if (args.discard) {
    s = Discard(dev.get(), dev_bytes);
    if (!s.ok()) {
      return Fail("formatted " + backing + ", but " + s.message() +
                  ": it is usable as it is, with the old data left in its free blocks");
    }
  }
  return 0;
}

}  // namespace deferfs
