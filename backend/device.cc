#include "backend/device.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "backend/ring.h"
#include "backend/undo_log.h"

// glibc 2.36 takes struct statx from <linux/stat.h>; older kernel headers
// lack the DIO alignment bit (the fields then stay zero and we fall back).
#ifndef STATX_DIOALIGN
#define STATX_DIOALIGN 0x00002000U
#endif

namespace deferfs {

AlignedBuffer::AlignedBuffer(size_t size, size_t align) {
  void* p = nullptr;
  // posix_memalign rejects size 0 on no platform, but keep data() non-null.
  if (posix_memalign(&p, align, size == 0 ? align : size) != 0) return;
  std::memset(p, 0, size);
  mem_.reset(p);
  size_ = size;
}

namespace {

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

std::string Errno(int err) { return std::strerror(err); }

Status OpenError(const std::string& path, int err) {
  switch (err) {
    case ENOENT:
      return Status::NotFound("backing device " + path +
                              " does not exist: create it or run 'deferfs mkfs " + path +
                              " --size SIZE'");
    case EACCES:
    case EPERM:
    case EROFS:
      return Status::Error(err, "cannot open backing device " + path +
                                    " read-write: " + Errno(err) +
                                    ": fix its permissions or run as a user that can write it");
    case EISDIR:
      return Status::Error(EISDIR, "backing device " + path +
                                       " is a directory: give a regular file or a block device");
    case EINVAL:
      return Status::Invalid("backing device " + path +
                             " does not support O_DIRECT: put the file on ext4, xfs or btrfs "
                             "(not tmpfs or a FUSE mount) or use a block device");
    default:
      return Status::Error(err, "cannot open backing device " + path + ": " + Errno(err));
  }
}

// Largest of the offset and memory DIO alignments, from statx when the
// kernel reports it (6.1+), else the block device's logical sector size.
uint32_t ProbeDioAlign(int fd, bool is_block_device) {
  struct statx stx;
  std::memset(&stx, 0, sizeof(stx));
  if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN) &&
      stx.stx_dio_offset_align != 0) {
    uint32_t a = std::max(stx.stx_dio_offset_align, stx.stx_dio_mem_align);
    if (IsPowerOfTwo(a)) return std::max<uint32_t>(a, 512);
  }
  int lbs = 0;
  if (is_block_device && ioctl(fd, BLKSSZGET, &lbs) == 0 && lbs > 0 && IsPowerOfTwo(lbs)) {
    return static_cast<uint32_t>(std::max(lbs, 512));
  }
  return 512;
}

}  // namespace

Device::Device(Key, std::string path, UniqueFd fd) : path_(std::move(path)), fd_(std::move(fd)) {}

Device::~Device() {
  // io_uring drops its references to a registered file asynchronously after
  // the ring is gone, which keeps the open file description — and the flock
  // on it — alive a little longer: let go of the lock explicitly, so the
  // backing is free the moment the daemon exits.
  if (locked_) ::flock(fd(), LOCK_UN);
}

Status Device::Open(const std::string& path, std::unique_ptr<Device>* out) {
  // Check the type before open(): opening a FIFO or a tty O_RDWR has side
  // effects (blocking, becoming a controlling terminal).
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return OpenError(path, errno);
  if (S_ISDIR(st.st_mode)) return OpenError(path, EISDIR);
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    return Status::Invalid("backing device " + path +
                           " is not a regular file or a block device");
  }

  UniqueFd fd(::open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC));
  if (!fd.valid()) return OpenError(path, errno);
  // The path may have been replaced between stat() and open(): trust fstat.
  if (::fstat(fd.get(), &st) != 0) {
    return Status::Error(errno, "cannot stat backing device " + path + ": " + Errno(errno));
  }
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    return Status::Invalid("backing device " + path +
                           " is not a regular file or a block device");
  }

  auto dev = std::make_unique<Device>(Key(), path, std::move(fd));
  dev->is_block_device_ = S_ISBLK(st.st_mode);
  if (dev->is_block_device_) {
    uint64_t bytes = 0;
    if (ioctl(dev->fd(), BLKGETSIZE64, &bytes) != 0) {
      return Status::Error(errno, "cannot read the size of block device " + path + ": " +
                                      Errno(errno));
    }
    dev->size_ = bytes;
  } else {
    dev->size_ = static_cast<uint64_t>(st.st_size);
  }
  dev->dio_align_ = ProbeDioAlign(dev->fd(), dev->is_block_device_);
  DEFERFS_RETURN_IF_ERROR(Ring::Create(4, /*single_issuer=*/false, &dev->sync_ring_));
  *out = std::move(dev);
  return Status::Ok();
}

Status Device::LockExclusive() {
  std::lock_guard<std::mutex> l(mu_);
  if (locked_) return Status::Ok();
  // flock locks belong to the open file description, so a second Device on
  // the same path (another mount, or mkfs) conflicts even in this process.
  while (::flock(fd(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    if (errno == EWOULDBLOCK) {
      return Status::Error(EBUSY, path_ +
                                      " is in use by another deferfs process (already mounted?): "
                                      "unmount it first");
    }
    return Status::Error(errno, "cannot lock backing device " + path_ + ": " + Errno(errno));
  }
  locked_ = true;
  return Status::Ok();
}

Status Device::CheckAligned(const char* what, uint64_t off, const void* buf,
                            uint32_t len) const {
  const uint64_t mask = dio_align_ - 1;
  if ((off & mask) || (len & mask) || (reinterpret_cast<uintptr_t>(buf) & mask)) {
    return Status::Invalid(std::string(what) + " of " + std::to_string(len) + " bytes at offset " +
                           std::to_string(off) + " on " + path_ + " is not aligned to " +
                           std::to_string(dio_align_) + " bytes (offset, length and buffer)");
  }
  return Status::Ok();
}

template <class Prep>
int Device::RunSync(Prep&& prep) {
  std::lock_guard<std::mutex> l(mu_);
  Ring& ring = *sync_ring_;
  // The ring is idle between calls (we always reap what we submit), so an
  // SQE is always free.
  struct io_uring_sqe* sqe = ring.GetSqe();
  prep(sqe);
  int rc;
  do {
    rc = ring.SubmitAndWait(1);
  } while (rc == -EINTR);
  if (rc < 0) return rc;
  int res = 0;
  unsigned n = 0;
  while ((n = ring.Reap([&](uint64_t, int r) { res = r; })) == 0) {
    rc = ring.WaitCqe();
    if (rc < 0 && rc != -EINTR) return rc;
  }
  return res;
}

Status Device::ReadSync(uint64_t off, void* buf, uint32_t len) {
  DEFERFS_RETURN_IF_ERROR(CheckAligned("read", off, buf, len));
  int res = RunSync([&](struct io_uring_sqe* sqe) { io_uring_prep_read(sqe, fd(), buf, len, off); });
  if (res < 0) {
    return Status::Error(-res, "read of " + std::to_string(len) + " bytes at offset " +
                                   std::to_string(off) + " from " + path_ + " failed: " +
                                   Errno(-res));
  }
  if (static_cast<uint32_t>(res) != len) {
    return Status::IoError("short read from " + path_ + ": " + std::to_string(res) + " of " +
                           std::to_string(len) + " bytes at offset " + std::to_string(off) +
                           " (past the end of the device?)");
  }
  return Status::Ok();
}

Status Device::WriteSync(uint64_t off, const void* buf, uint32_t len) {
  DEFERFS_RETURN_IF_ERROR(CheckAligned("write", off, buf, len));
  uint64_t undo_seq = 0;
  if (undo_log_) DEFERFS_RETURN_IF_ERROR(undo_log_->BeforeWrite(off, len, &undo_seq));
  int res =
      RunSync([&](struct io_uring_sqe* sqe) { io_uring_prep_write(sqe, fd(), buf, len, off); });
  if (res < 0) {
    return Status::Error(-res, "write of " + std::to_string(len) + " bytes at offset " +
                                   std::to_string(off) + " to " + path_ + " failed: " +
                                   Errno(-res));
  }
  if (static_cast<uint32_t>(res) != len) {
    return Status::IoError("short write to " + path_ + ": " + std::to_string(res) + " of " +
                           std::to_string(len) + " bytes at offset " + std::to_string(off) +
                           " (device full?)");
  }
  if (undo_log_) undo_log_->Completed(undo_seq, /*fua=*/false);
  return Status::Ok();
}

Status Device::FlushSync() {
  const uint64_t mark = undo_log_ ? undo_log_->FlushStarts() : 0;
  int res = RunSync([&](struct io_uring_sqe* sqe) { io_uring_prep_fsync(sqe, fd(), 0); });
  if (res < 0) {
    return Status::Error(-res, "flush of " + path_ + " failed: " + Errno(-res));
  }
  if (undo_log_) undo_log_->Flushed(mark);
  return Status::Ok();
}

Status Device::KeepUndoLog(const std::string& path) { return UndoLog::Create(path, fd(), dio_align_, &undo_log_); }

}  // namespace deferfs
