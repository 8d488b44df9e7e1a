// Device: the backing store, a regular file or block device opened
// O_RDWR|O_DIRECT, and AlignedBuffer, the memory its IO needs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>

#include "backend/status.h"
#include "backend/unique_fd.h"

namespace deferfs {

class Ring;
class UndoLog;

// A zero-filled heap buffer whose address is a multiple of `align` (a power
// of two >= sizeof(void*)), as O_DIRECT needs. data() is nullptr when the
// allocation failed. Move-only; thread-compatible.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(size_t size, size_t align);

  void* data() const { return mem_.get(); }
  uint8_t* bytes() const { return static_cast<uint8_t*>(mem_.get()); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> mem_;
  size_t size_ = 0;
};

// An open backing file or block device, O_RDWR|O_DIRECT|O_CLOEXEC.
// Thread-safe after Open: the geometry is immutable, and the *Sync calls
// serialize on an internal mutex around their private ring.
class Device {
 public:
  // Fails with a one-line Status naming `path` and the fix (ENOENT when
  // missing, EISDIR/EINVAL for the wrong file type, EACCES, ...).
  static Status Open(const std::string& path, std::unique_ptr<Device>* out);
  ~Device();

  int fd() const { return fd_.get(); }
  uint64_t size() const { return size_; }  // bytes
  // Offset, length and memory alignment every IO must honour (power of two).
  uint32_t dio_align() const { return dio_align_; }
  bool is_block_device() const { return is_block_device_; }
  const std::string& path() const { return path_; }

  // Takes flock(LOCK_EX) without waiting and holds it until the Device is
  // destroyed; EBUSY when another open of the same backing holds it.
  // Idempotent on one Device.
  Status LockExclusive();

  // Synchronous IO for mkfs/mount/fsck through a private io_uring (all device
  // IO goes through io_uring). off, len and buf must be dio_align()-aligned.
  // Transfers all of len or fails; a short transfer is EIO.
  Status ReadSync(uint64_t off, void* buf, uint32_t len);
  Status WriteSync(uint64_t off, const void* buf, uint32_t len);
  Status FlushSync();  // fsync: data and metadata of a file backing

  // Testing only (mount option undo_log=PATH): from now on every write and
  // flush through this Device, or through a Poller started over it, is
  // recorded in a new undo log at `path` (backend/undo_log.h). Call it
  // before the first Poller starts; the Device must outlive every Poller
  // and MetaStore given undo_log().
  Status KeepUndoLog(const std::string& path);
  UndoLog* undo_log() const { return undo_log_.get(); }

 private:
  class Key {
    friend class Device;
    Key() = default;
  };

 public:
  Device(Key, std::string path, UniqueFd fd);

 private:
  Status CheckAligned(const char* what, uint64_t off, const void* buf, uint32_t len) const;
  // Runs one prepared-by-`prep` op on sync_ring_ and returns its CQE result.
  template <class Prep>
  int RunSync(Prep&& prep);

  const std::string path_;
  const UniqueFd fd_;
  uint64_t size_ = 0;
  uint32_t dio_align_ = 512;
  bool is_block_device_ = false;

  std::mutex mu_;                    // guards locked_ and sync_ring_
  bool locked_ = false;
  std::unique_ptr<Ring> sync_ring_;  // set by Open; not single-issuer
  std::unique_ptr<UndoLog> undo_log_;  // set before any IO that it records
};

}  // namespace deferfs
