// WorkerPool: the FUSE workers — our own loop over the session's requests.
// Each worker runs its task_work (deferred completions) before it takes the
// next request. With transport=dev it reads them from the non-blocking
// /dev/fuse fd, into an IoBuffer laid out so a WRITE's payload lands
// page-aligned, and sleeps in epoll (EPOLLEXCLUSIVE: one woken per request)
// on that fd and its task_work eventfd. With FUSE over io_uring it takes them
// from its FuseRing (mount/fuse_uring.h) and sleeps there, on the same fds too.
// Start/Stop from one thread; the workers are internal.
#pragma once

#include <fuse_lowlevel.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "backend/device.h"
#include "backend/status.h"
#include "fs/filesystem.h"
#include "mount/fuse_uring.h"

namespace deferfs {

class WorkerPool {
 public:
  struct Worker;

  // Starts `n` workers on `se` (mounted) once the INIT handshake is done.
  // uring_depth > 0: FUSE over io_uring with that many entries per kernel
  // queue, or fail. `fs` serves what libfuse 3.14 has no callback for
  // (FUSE_SYNCFS).
  static Status Start(fuse_session* se, Filesystem* fs, unsigned n, unsigned uring_depth,
                      std::unique_ptr<WorkerPool>* out);
  ~WorkerPool();  // Stop(); the TaskWorks go only now (see mount_command.cc)

  // Readable (eventfd) once a worker saw the session end (unmount or error).
  int exit_fd() const { return exit_fd_.get(); }
  // Joins the workers once each has run its last deferred completion.
  void Stop();

  WorkerPool(fuse_session* se, Filesystem* fs);

 private:
  enum class DevRead { kProcessed, kEmpty, kOver };
  Status ServeInit();
  void Run(Worker* w);
  void RunDev(Worker* w);
  void RunRing(Worker* w);
  DevRead ReadDev(Worker* w);  // one request from /dev/fuse
  bool Process(uint8_t* req, size_t len);  // false: the session is over
  void SessionOver();

  fuse_session* const se_;
  Filesystem* const fs_;
  int fuse_fd_;
  UniqueFd stop_fd_;  // level-triggered in every worker's epoll set
  UniqueFd exit_fd_;
  std::unique_ptr<FuseUring> uring_;  // null: transport=dev
  std::vector<std::unique_ptr<Worker>> workers_;
  bool stopped_ = false;
};

}  // namespace deferfs
