#include "mount/worker_loop.h"

#include <fcntl.h>
#include <linux/fuse.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstring>

namespace deferfs {
namespace {

// 1 MiB max_write plus a page for the request headers.
constexpr size_t kMaxWrite = 1 << 20;
constexpr size_t kPayloadAlign = 4096;
// A WRITE request is fuse_in_header + fuse_write_in, then the payload. The
// receive buffer starts this far before a page boundary so that the payload
// lands page-aligned and goes to the O_DIRECT device without a copy.
constexpr size_t kWriteHeaderBytes = sizeof(fuse_in_header) + sizeof(fuse_write_in);
static_assert(kWriteHeaderBytes == 80);
constexpr size_t kRecvBytes = kMaxWrite + kPayloadAlign;

void Signal(int efd) {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(efd, &one, sizeof(one));
}

}  // namespace

struct WorkerPool::Worker {
  unsigned index = 0;
  UniqueFd epoll_fd;
  UniqueFd event_fd;  // task_work wakeups
  AlignedBuffer recv;  // kPayloadAlign + kRecvBytes
  uint8_t* req = nullptr;  // recv + kPayloadAlign - kWriteHeaderBytes
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
    w->event_fd = UniqueFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    w->recv = AlignedBuffer(kPayloadAlign + kRecvBytes, kPayloadAlign);
    if (!w->epoll_fd.valid() || !w->event_fd.valid() || w->recv.data() == nullptr) {
      return Status::IoError("cannot set up a FUSE worker");
    }
    w->req = w->recv.bytes() + kPayloadAlign - kWriteHeaderBytes;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLEXCLUSIVE;  // one worker per incoming request
    ev.data.fd = pool->fuse_fd_;
    int rc = epoll_ctl(w->epoll_fd.get(), EPOLL_CTL_ADD, pool->fuse_fd_, &ev);
    ev.events = EPOLLIN;
    ev.data.fd = w->event_fd.get();
    rc |= epoll_ctl(w->epoll_fd.get(), EPOLL_CTL_ADD, w->event_fd.get(), &ev);
    ev.data.fd = pool->stop_fd_.get();
    rc |= epoll_ctl(w->epoll_fd.get(), EPOLL_CTL_ADD, pool->stop_fd_.get(), &ev);
    if (rc != 0) return Status::IoError(std::string("epoll_ctl: ") + strerror(errno));
    pool->workers_.push_back(std::move(w));
  }
  for (auto& w : pool->workers_) {
    Worker* wp = w.get();
    WorkerPool* pp = pool.get();
    w->thread = std::thread([pp, wp] { pp->Run(wp); });
  }
  *out = std::move(pool);
  return Status::Ok();
}

WorkerPool::~WorkerPool() { Stop(); }

void WorkerPool::Stop() {
  if (stop_fd_.valid()) Signal(stop_fd_.get());
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();
  }
}

void WorkerPool::Run(Worker* w) {
  for (;;) {
    ssize_t n = read(fuse_fd_, w->req, kRecvBytes);
    if (n > 0) {
      if (!Process(w, static_cast<size_t>(n))) break;
      continue;
    }
    int err = n < 0 ? errno : ENODEV;
    if (err == EINTR || err == ENOENT) continue;  // ENOENT: the request was interrupted
    if (err != EAGAIN) {
      // ENODEV: unmounted. Anything else: the connection is unusable.
      fuse_session_exit(se_);
      Signal(exit_fd_.get());
      break;
    }
    epoll_event evs[3];
    int ready = epoll_wait(w->epoll_fd.get(), evs, 3, -1);
    bool stop = false;
    for (int i = 0; i < ready; i++) {
      if (evs[i].data.fd == stop_fd_.get()) stop = true;
      if (evs[i].data.fd == w->event_fd.get()) {
        uint64_t v;
        [[maybe_unused]] ssize_t r = read(w->event_fd.get(), &v, sizeof(v));
      }
    }
    if (stop) break;
  }
}

bool WorkerPool::Process(Worker* w, size_t len) {
  const auto* in = reinterpret_cast<const fuse_in_header*>(w->req);
  if (len >= sizeof(*in) && in->opcode == FUSE_SYNCFS) {
    // libfuse 3.14 has no syncfs callback and would answer ENOSYS, which the
    // kernel takes as "nothing to do": answer it here so syncfs(2) is durable.
    Status st = fs_->Sync();
    fuse_out_header out{sizeof(fuse_out_header), st.ok() ? 0 : -st.err(), in->unique};
    [[maybe_unused]] ssize_t r = write(fuse_fd_, &out, sizeof(out));
    return true;
  }
  fuse_buf buf{};
  buf.mem = w->req;
  buf.size = len;
  fuse_session_process_buf(se_, &buf);
  return !fuse_session_exited(se_);
}

}  // namespace deferfs
