#include "mount/worker_loop.h"

#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstring>

#include "backend/log.h"

namespace deferfs {
namespace {

constexpr size_t kPayloadAlign = 4096;
// A WRITE request is fuse_in_header + fuse_write_in, then the payload. The
// request is read this far before a page boundary of the IoBuffer so that the
// payload lands page-aligned and goes to the O_DIRECT device without a copy.
constexpr size_t kWriteHeaderBytes = sizeof(fuse_in_header) + sizeof(fuse_write_in);
static_assert(kWriteHeaderBytes == 80);
// The kernel wants room for the largest WRITE: headers plus max_write.
constexpr size_t kRecvBytes = kWriteHeaderBytes + kMaxIo;
static_assert(kPayloadAlign - kWriteHeaderBytes + kRecvBytes <= kIoBufferBytes);

void Signal(int efd) {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(efd, &one, sizeof(one));
}

}  // namespace

struct WorkerPool::Worker {
  unsigned index = 0;
  UniqueFd epoll_fd;
  TaskWork tw;               // deferred completions; its eventfd wakes us
  IoBuffer* recv = nullptr;  // receive buffer; taken by async writes
  std::thread thread;
};

WorkerPool::WorkerPool(fuse_session* se, Filesystem* fs) : se_(se), fs_(fs), fuse_fd_(fuse_session_fd(se)) {}

Status WorkerPool::Start(fuse_session* se, Filesystem* fs, unsigned n, std::unique_ptr<WorkerPool>* out) {
  auto pool = std::make_unique<WorkerPool>(se, fs);
  int flags = fcntl(pool->fuse_fd_, F_GETFL);
  if (flags < 0 || fcntl(pool->fuse_fd_, F_SETFL, flags | O_NONBLOCK) < 0) {
    return Status::IoError(std::string("cannot make the FUSE fd non-blocking: ") + strerror(errno));
  }
  pool->stop_fd_ = UniqueFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  pool->exit_fd_ = UniqueFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!pool->stop_fd_.valid() || !pool->exit_fd_.valid()) return Status::IoError("cannot create eventfds");

  for (unsigned i = 0; i < n; i++) {
    auto w = std::make_unique<Worker>();
    w->index = i;
    w->epoll_fd = UniqueFd(epoll_create1(EPOLL_CLOEXEC));
    if (!w->epoll_fd.valid() || w->tw.event_fd() < 0) return Status::IoError("cannot set up a FUSE worker");
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLEXCLUSIVE;  // one worker per incoming request
    ev.data.fd = pool->fuse_fd_;
    int rc = epoll_ctl(w->epoll_fd.get(), EPOLL_CTL_ADD, pool->fuse_fd_, &ev);
    ev.events = EPOLLIN;
    ev.data.fd = w->tw.event_fd();
    rc |= epoll_ctl(w->epoll_fd.get(), EPOLL_CTL_ADD, w->tw.event_fd(), &ev);
    ev.data.fd = pool->stop_fd_.get();
    rc |= epoll_ctl(w->epoll_fd.get(), EPOLL_CTL_ADD, pool->stop_fd_.get(), &ev);
    if (rc != 0) return Status::IoError(std::string("epoll_ctl: ") + strerror(errno));
    pool->workers_.push_back(std::move(w));
  }
  for (auto& w : pool->workers_) {
    fs->RegisterTaskWork(&w->tw);
    Worker* wp = w.get();
    WorkerPool* pp = pool.get();
    w->thread = std::thread([pp, wp] { pp->Run(wp); });
  }
  *out = std::move(pool);
  return Status::Ok();
}

WorkerPool::~WorkerPool() { Stop(); }

void WorkerPool::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (stop_fd_.valid()) Signal(stop_fd_.get());
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();
  }
  fs_->UnregisterTaskWorks();
}

void WorkerPool::Run(Worker* w) {
  pthread_setname_np(pthread_self(), "deferfs-worker");
  TaskWork::SetCurrent(&w->tw);
  IoBufferPool& pool = fs_->buffers();
  bool stop = false;
  while (!stop) {
    // Completions first: they finish requests that are already paid for.
    w->tw.RunPending();
    if (w->recv == nullptr) w->recv = pool.Get();
    uint8_t* req = w->recv->base + kPayloadAlign - kWriteHeaderBytes;
    ssize_t n = read(fuse_fd_, req, kRecvBytes);
    if (n > 0) {
      RecvBufferSlot::Set(w->recv);
      bool go_on = Process(req, static_cast<size_t>(n));
      if (RecvBufferSlot::Take() == nullptr) w->recv = nullptr;  // an async write kept it
      if (!go_on) break;
      continue;
    }
    int err = n < 0 ? errno : ENODEV;
    if (err == EINTR || err == ENOENT) continue;  // ENOENT: the request was interrupted
    if (err != EAGAIN) {
      // ENODEV: unmounted. Anything else: the connection is unusable.
      if (err != ENODEV) LogError("reading the FUSE device failed: %s: the mount stops", strerror(err));
      fuse_session_exit(se_);
      Signal(exit_fd_.get());
      break;
    }
    if (!w->tw.PrepareSleep()) continue;
    epoll_event evs[3];
    int ready = epoll_wait(w->epoll_fd.get(), evs, 3, -1);
    w->tw.Awake();
    for (int i = 0; i < ready; i++) stop |= evs[i].data.fd == stop_fd_.get();
  }
  // IO may still be in flight with completions bound for this worker's
  // task_work: keep running it until the engine is idle.
  while (fs_->engine().stats().inflight.load(std::memory_order_acquire) > 0) {
    if (w->tw.RunPending() == 0) {
      pollfd p{w->tw.event_fd(), POLLIN, 0};
      poll(&p, 1, 10);
    }
  }
  if (w->recv) pool.Put(w->recv);
}

bool WorkerPool::Process(uint8_t* req, size_t len) {
  const auto* in = reinterpret_cast<const fuse_in_header*>(req);
  if (len >= sizeof(*in) && in->opcode == FUSE_SYNCFS) {
    // Linux forwards syncfs(2) to a FUSE server only for virtiofs so far
    // (fc->sync_fs), and libfuse 3.14 has no callback for it; should a kernel
    // send it, answer it here so syncfs(2) is a durability point.
    Status st = fs_->Sync();
    fuse_out_header out{sizeof(fuse_out_header), st.ok() ? 0 : -st.err(), in->unique};
    [[maybe_unused]] ssize_t r = write(fuse_fd_, &out, sizeof(out));
    return true;
  }
  fuse_buf buf{};
  buf.mem = req;
  buf.size = len;
  fuse_session_process_buf(se_, &buf);
  return !fuse_session_exited(se_);
}

}  // namespace deferfs
