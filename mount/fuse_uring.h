// FUSE over io_uring (Linux 6.14+). The kernel keeps a queue of request slots
// ("entries") per possible CPU and hands an application's request to an idle
// entry of its CPU's queue. An entry is a header and a payload buffer that a
// server registered with an io_uring command on /dev/fuse; a request arrives
// as that command's completion, and the reply goes back in the same buffers
// with COMMIT_AND_FETCH, which also waits for the entry's next request. No
// read(2) and no writev(2) per request: a worker's replies and fetches leave
// together in one io_uring_enter. FORGET and INTERRUPT still come by read(2).
//
// FuseUring is the transport: it asks for io_uring in the INIT reply, owns
// the entries and routes libfuse's replies (its custom-io writev) to the entry
// of their request; thread-safe. FuseRing is one worker's ring: the entries of
// the queues that worker serves plus polls on fds that also wake it; owner
// thread only. A reply made on another thread (the poller finishing a read)
// goes to the owner's task_work, which commits it.
#pragma once

#include <fuse_lowlevel.h>
#include <liburing.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "backend/status.h"
#include "fs/filesystem.h"
#include "fs/io_buffers.h"
#include "fs/task_work.h"
#include "mount/fuse_uring_abi.h"
#include "mount/request_table.h"

namespace deferfs {

class FuseRing;
struct FuseRingEntry;

class FuseUring {
 public:
  // The kernel offers FUSE over io_uring: built in and switched on.
  static bool KernelEnabled();
  // The kernel's queue count: one per possible CPU.
  static unsigned KernelQueues();
  // Entries per queue when uring_depth= is not given: 32, fewer with more than 8 queues.
  static unsigned DefaultDepth(unsigned queues);

  // `depth` entries on each kernel queue, the queues spread over `workers`
  // rings; entry buffers come from `pool` (registered with the pollers, so
  // bios read into and write from them in place). Installs the reply hook
  // on `se`; one transport per process.
  static Status Create(fuse_session* se, IoBufferPool* pool, FuseTransportStats* stats, unsigned workers,
                       unsigned depth, std::unique_ptr<FuseUring>* out);
  FuseUring(fuse_session* se, IoBufferPool* pool, FuseTransportStats* stats, size_t nentries);
  ~FuseUring();  // closes the rings if Close was not called

  // The INIT request, before libfuse processes it: does the kernel offer io_uring?
  void SawInit(const uint8_t* req, size_t len);
  // After INIT: the reply asked for io_uring, so the kernel waits for the
  // rings to be registered and then sends requests only through them.
  bool negotiated() const { return negotiated_.load(std::memory_order_acquire); }

  unsigned rings() const { return static_cast<unsigned>(rings_.size()); }
  FuseRing* ring(unsigned worker) { return rings_[worker].get(); }
  // After every worker stopped: closes the rings (the kernel cancels their
  // commands) and gives the entry buffers back.
  void Close();

  // A reply to the session's request: through its ring slot if it came
  // through one, else writev(2) on `fd`. libfuse's replies come here too.
  static ssize_t Send(int fd, iovec* iov, int count);

 private:
  friend class FuseRing;
  static ssize_t WritevHook(int fd, iovec* iov, int count, void* userdata);
  static ssize_t ReadHook(int fd, void* buf, size_t len, void* userdata);
  ssize_t Writev(int fd, iovec* iov, int count);
  void PatchInitReply(iovec* iov, int count);

  fuse_session* const se_;
  IoBufferPool* const pool_;
  FuseTransportStats* const stats_;
  std::vector<std::unique_ptr<FuseRing>> rings_;
  std::atomic<uint64_t> init_unique_{0};
  std::atomic<bool> init_offered_{false};
  std::atomic<bool> negotiated_{false};

  RequestTable<FuseRingEntry> serving_;  // unique -> entry of each request being served
};

class FuseRing final : public Plug {
 public:
  // What the ring delivered.
  struct Event {
    enum Kind { kRequest, kFdReady, kClosed } kind = kRequest;
    // kRequest: the request laid out as read(2) from /dev/fuse would give it,
    // and the entry's payload buffer, lent to the request until its reply.
    uint8_t* req = nullptr;
    size_t len = 0;
    IoBuffer* payload = nullptr;
    int fd = -1;   // kFdReady
    int err = 0;   // kClosed: why the kernel ended the entries (ENOTCONN: unmounted)
  };

  FuseRing(FuseUring* t, unsigned nentries);
  ~FuseRing();

  // Owner: creates the ring, registers the entries and arms a multishot
  // poll on each of `fds`. Errors are the kernel's refusal to register.
  Status Start(TaskWork* owner, std::span<const int> fds);
  // Owner: takes what completed. With `wait` (after TaskWork::PrepareSleep)
  // it first submits what is queued and sleeps until something completes.
  // Returns how many events it wrote; a kClosed one is the last ever.
  size_t Reap(bool wait, std::span<Event> out);
  // Owner: submits queued commits.
  void Flush() override;

 private:
  friend class FuseUring;
  void Register(FuseRingEntry* e);  // owner
  void Commit(FuseRingEntry* e);    // owner
  static void CommitWork(TaskWorkCallback* cb);
  void ArmPoll(int fd);
  size_t Closed(std::span<Event> out, size_t n, int err);
  io_uring_sqe* GetSqe();

  FuseUring* const t_;
  TaskWork* owner_ = nullptr;
  int fuse_fd_ = -1;
  io_uring ring_{};
  bool ring_ok_ = false;
  bool closed_ = false;
  std::vector<std::unique_ptr<FuseRingEntry>> entries_;
};

}  // namespace deferfs
