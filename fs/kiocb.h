// Kiocb: one IO request as the dio engine sees it — the kernel's struct kiocb
// with the seed patch's fields. The issuer (the FUSE layer) owns it and sets
// ki_complete; the dio engine may set dio_complete/private_data (only when
// the issuer passed IOCB_DIO_DEFER) before calling ki_complete.
#pragma once

#include <sys/types.h>

#include <cstdint>

namespace deferfs {

struct Inode;

enum : uint32_t {
  IOCB_WRITE = 1u << 0,
  IOCB_DSYNC = 1u << 1,  // O_DSYNC/O_SYNC or a sync mount: durable before completion
  IOCB_DIO_DEFER = 1u << 2,  // the issuer can run dio_complete from its own context
  // deferfs-internal: a write of whole blocks that must not move i_size
  // (zeroing part of the last one; Filesystem::SyncRw without an isize).
  IOCB_NOEXTEND = 1u << 3,
  // O_SYNC: like IOCB_DSYNC, and the inode's timestamps durable too (the
  // kernel's IOCB_SYNC: generic_write_sync with datasync=0).
  IOCB_SYNC = 1u << 4,
};

// EIOCBQUEUED: the request went async; ki_complete will be called.
inline constexpr ssize_t kIocbQueued = -529;

struct Kiocb {
  Inode* inode = nullptr;
  uint64_t pos = 0;
  uint32_t ki_flags = 0;
  // deferfs-internal, writes: the file's size after this write if it ends
  // past i_size, when that is not pos + len (a read-modify-write's blocks
  // run past its data). 0: pos + len.
  uint64_t ki_isize = 0;

  // Called once, from whichever thread finishes the IO (the poller, a
  // completion thread, or the issuer). If dio_complete is set, the issuer
  // must call dio_complete(private_data) from its own context and use the
  // value it returns as the result; `res` is then meaningless.
  void (*ki_complete)(Kiocb* iocb, ssize_t res) = nullptr;
  ssize_t (*dio_complete)(void* data) = nullptr;
  void* private_data = nullptr;

  Kiocb* ki_next = nullptr;  // link on the issuer's task_work list
};

}  // namespace deferfs
