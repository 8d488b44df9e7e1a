#include "fs/fuse_io.h"

#include <fcntl.h>
#include <linux/fuse.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>

#include "fs/filesystem.h"

namespace deferfs {
namespace {

// One READ or WRITE in flight. Standard layout with the Kiocb first, so
// ki_complete gets from the kiocb back to its request.
//
// The reply goes out only once both the completion and the submitter are
// done with the request (two references, like the kernel's EIOCBQUEUED plus
// the syscall's file reference): the kernel may release the file, and we may
// evict its inode, as soon as it has the reply, while a submitter that is
// still unlocking the inode would otherwise touch freed memory.
struct FuseIo {
  Kiocb iocb;
  std::atomic<int> refs{2};
  ssize_t result = 0;  // set by the completion, read by whoever drops the last reference
  fuse_req_t req = nullptr;
  Filesystem* fs = nullptr;
  TaskWork* issuer = nullptr;
  IoBuffer* buf = nullptr;  // data buffer; returned to the pool with the reply if owned
  bool owns_buf = false;
  size_t data_off = 0;      // reads: where the data starts in buf
  bool write = false;
  int64_t start_ns = 0;
};
static_assert(std::is_standard_layout_v<FuseIo>);

void Finish(FuseIo* raw, ssize_t res) {
  std::unique_ptr<FuseIo> io(raw);
  if (res < 0) fuse_reply_err(io->req, static_cast<int>(-res));
  else if (io->write) fuse_reply_write(io->req, static_cast<size_t>(res));
  else fuse_reply_buf(io->req, reinterpret_cast<const char*>(io->buf->base + io->data_off), static_cast<size_t>(res));
  LiveGauges& g = io->fs->gauges();
  if (io->owns_buf) {
    io->fs->buffers().Put(io->buf);
    LiveGauges::Down(g.request_buffers);
  }
  DioStats& st = io->fs->engine().stats();
  (io->write ? st.write_reply : st.read_reply).Record(MonotonicNs() - io->start_ns);
  LiveGauges::Down(g.fuse_requests);
}

// The request now uses `b` until it is answered.
void Attach(FuseIo* io, RecvBuffer b) {
  io->buf = b.buf;
  io->owns_buf = b.owned;
  if (b.owned) LiveGauges::Up(io->fs->gauges().request_buffers);
}

RecvBuffer FromPool(Filesystem* fs) { return RecvBuffer{fs->buffers().Get(), true}; }

// ki_complete, the seed's issuer side: a kiocb that comes back with
// dio_complete set goes to its issuer's task_work (which runs dio_complete
// and calls us again with the real result); otherwise reply right here.
void FuseKiComplete(Kiocb* iocb, ssize_t res) {
  FuseIo* io = reinterpret_cast<FuseIo*>(iocb);
  if (iocb->dio_complete) {
    io->issuer->Push(iocb);
    return;
  }
  io->result = res;
  if (io->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) Finish(io, res);
}

// The submitter's side: a queued request is answered by the completion or,
// if that already ran, here; anything else is answered now.
void Submitted(std::unique_ptr<FuseIo> io, ssize_t res) {
  FuseIo* raw = io.release();
  if (res != kIocbQueued) return Finish(raw, res);
  if (raw->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) Finish(raw, raw->result);
}

// A write by someone without CAP_FSETID clears setuid, and setgid if group-
// executable: the rule the kernel's FUSE setattr applies to buffered writes.
// For a direct_io file the kernel leaves it to us with FUSE_WRITE_KILL_SUIDGID
// in the request; libfuse drops the flag, so it is read from the fuse_write_in
// that precedes the payload in the request buffer (mount/worker_loop.cc relies
// on that layout too).
void KillSuidGid(Filesystem* fs, Inode* inode, const char* payload) {
  fuse_write_in in;
  std::memcpy(&in, payload - sizeof(in), sizeof(in));
  if (!(in.write_flags & FUSE_WRITE_KILL_SUIDGID)) return;
  uint32_t mode;
  {
    std::lock_guard l(inode->mu);
    mode = inode->rec.mode;
  }
  uint32_t kill = S_ISUID;
  if ((mode & (S_ISGID | S_IXGRP)) == (S_ISGID | S_IXGRP)) kill |= S_ISGID;
  if (!(mode & kill)) return;
  SetAttrRequest r;
  r.valid = SetAttrRequest::kMode;
  r.attr.st_mode = mode & ~kill;
  struct stat st;
  (void)fs->SetAttr(inode->ino, r, &st);  // as the kernel: the write goes on regardless
}

std::unique_ptr<FuseIo> NewIo(fuse_req_t req, fuse_file_info* fi, off_t off, bool write) {
  auto io = std::make_unique<FuseIo>();
  io->req = req;
  io->fs = static_cast<Filesystem*>(fuse_req_userdata(req));
  LiveGauges::Up(io->fs->gauges().fuse_requests);
  io->issuer = TaskWork::Current();
  io->write = write;
  io->start_ns = MonotonicNs();
  io->iocb.inode = reinterpret_cast<Inode*>(fi->fh);
  io->iocb.pos = static_cast<uint64_t>(off);
  io->iocb.ki_flags = IOCB_DIO_DEFER | (write ? uint32_t{IOCB_WRITE} : 0u);
  if (write && (fi->flags & (O_DSYNC | O_SYNC))) io->iocb.ki_flags |= IOCB_DSYNC;
  if (write && (fi->flags & O_SYNC) == O_SYNC) io->iocb.ki_flags |= IOCB_SYNC;  // O_SYNC includes O_DSYNC
  // A sync mount: the kernel's IS_SYNC, which never reaches us for a
  // direct_io file. Like iocb_is_dsync(), it means O_DSYNC (a pure overwrite
  // owes no timestamps); only an O_SYNC file asks for them too.
  if (write && io->fs->synchronous()) io->iocb.ki_flags |= IOCB_DSYNC;
  // completion=sync: a synchronous kiocb, the worker waits for its own IO.
  if (io->fs->completion_mode() != CompletionMode::kSync) io->iocb.ki_complete = FuseKiComplete;
  return io;
}

}  // namespace

void FuseRead(fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
  auto io = NewIo(req, fi, off, false);
  // A FUSE ring entry lends its payload buffer, where the reply has to go
  // anyway: the device reads straight into it if the covering blocks fit.
  RecvBuffer lent = RecvBufferSlot::Take();
  size = std::min(size, kMaxIo);
  if (lent.buf && !lent.owned && Filesystem::ReadSpan(static_cast<uint64_t>(off), size) <= lent.buf->size) {
    Attach(io.get(), lent);
  } else {
    RecvBufferSlot::Set(lent);
    Attach(io.get(), FromPool(io->fs));
  }
  ssize_t res = io->fs->ReadIter(&io->iocb, io->buf, size, &io->data_off);
  Submitted(std::move(io), res);
}

void FuseWrite(fuse_req_t req, fuse_ino_t, const char* data, size_t size, off_t off, fuse_file_info* fi) {
  auto io = NewIo(req, fi, off, true);
  // Past the largest file size: EFBIG, or a short write that stops there
  // (the kernel's generic_write_check_limits; it only knows MAX_LFS_FILESIZE).
  if (off < 0 || static_cast<uint64_t>(off) >= kMaxFileSize) return Finish(io.release(), size ? -EFBIG : 0);
  size = std::min<uint64_t>(size, kMaxFileSize - static_cast<uint64_t>(off));
  KillSuidGid(io->fs, io->iocb.inode, data);
  const auto* payload = reinterpret_cast<const uint8_t*>(data);
  // Zero copy: the payload sits aligned in the worker's receive buffer; the
  // request takes that buffer along until it is answered.
  RecvBuffer recv = RecvBufferSlot::Take();
  if (recv.buf == nullptr || payload < recv.buf->base || payload + size > recv.buf->base + recv.buf->size) {
    RecvBufferSlot::Set(recv);  // not ours after all: give it back
    Attach(io.get(), FromPool(io->fs));
    if (size > io->buf->size) {
      Finish(io.release(), -EINVAL);
      return;
    }
    std::memcpy(io->buf->base, payload, size);
    payload = io->buf->base;
  } else {
    Attach(io.get(), recv);
  }
  ssize_t res = io->fs->WriteIter(&io->iocb, io->buf, payload, size);
  Submitted(std::move(io), res);
}

}  // namespace deferfs
