// WorkerPool: the FUSE workers — our own loop over the session's /dev/fuse fd.
// Each worker runs its task_work (deferred completions) before it reads the
// next request, and sleeps (epoll, EPOLLEXCLUSIVE: one woken per request) on
// the non-blocking FUSE fd and its task_work eventfd. A request is read into
// an IoBuffer laid out so a WRITE's payload lands page-aligned.
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

namespace deferfs {

class WorkerPool {
 public:
  struct Worker;

  // Starts `n` workers on `se` (mounted). `fs` serves what libfuse 3.14 has no
  // callback for (FUSE_SYNCFS).
  static Status Start(fuse_session* se, Filesystem* fs, unsigned n, std::unique_ptr<WorkerPool>* out);
  ~WorkerPool();  // Stop(); the TaskWorks go only now (see mount_command.cc)

  // Readable (eventfd) once a worker saw the session end (unmount or error).
  int exit_fd() const { return exit_fd_.get(); }
  // Joins the workers once each has run its last deferred completion.
  void Stop();

  WorkerPool(fuse_session* se, Filesystem* fs);

 private:
  void Run(Worker* w);
  bool Process(uint8_t* req, size_t len);  // false: the session is over

  fuse_session* const se_;
  Filesystem* const fs_;
  int fuse_fd_;
  UniqueFd stop_fd_;  // level-triggered in every worker's epoll set
  UniqueFd exit_fd_;
  std::vector<std::unique_ptr<Worker>> workers_;
  bool stopped_ = false;
};

}  // namespace deferfs
