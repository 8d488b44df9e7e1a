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
#include <future>

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
  IoBuffer* recv = nullptr;  // receive buffer for read(2); taken by async writes
  FuseRing* ring = nullptr;  // FUSE over io_uring: where requests come from
  std::promise<Status> started;
  std::thread thread;
};

WorkerPool::WorkerPool(fuse_session* se, Filesystem* fs) : se_(se), fs_(fs), fuse_fd_(fuse_session_fd(se)) {}

Status WorkerPool::Start(fuse_session* se, Filesystem* fs, unsigned n, unsigned uring_depth,
                         std::unique_ptr<WorkerPool>* out) {
  auto pool = std::make_unique<WorkerPool>(se, fs);
  int flags = fcntl(pool->fuse_fd_, F_GETFL);
  if (flags < 0 || fcntl(pool->fuse_fd_, F_SETFL, flags | O_NONBLOCK) < 0) {
    return Status::IoError(std::string("cannot make the FUSE fd non-blocking: ") + strerror(errno));
  }
  pool->stop_fd_ = UniqueFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  pool->exit_fd_ = UniqueFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!pool->stop_fd_.valid() || !pool->exit_fd_.valid()) return Status::IoError("cannot create eventfds");
  if (uring_depth > 0) {
    Status s = FuseUring::Create(se, &fs->buffers(), &fs->fuse_stats(), n, uring_depth, &pool->uring_);
    if (!s.ok()) return s;
  }
  // The kernel's first request; its reply decides the transport.
  Status s = pool->ServeInit();
  if (!s.ok()) return s;
  if (pool->uring_ && !pool->uring_->negotiated()) {
    return Status::Error(EOPNOTSUPP, "the kernel did not offer FUSE over io_uring in INIT: mount with transport=dev");
  }
  fs->set_transport(pool->uring_ ? "uring" : "dev");

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
    // With more workers than kernel queues the rest serve read(2) only.
    if (pool->uring_ && i < pool->uring_->rings()) w->ring = pool->uring_->ring(i);
    pool->workers_.push_back(std::move(w));
  }
  for (auto& w : pool->workers_) {
    fs->RegisterTaskWork(&w->tw);
    Worker* wp = w.get();
    WorkerPool* pp = pool.get();
    w->thread = std::thread([pp, wp] { pp->Run(wp); });
  }
  // A ring registers its entries from its worker's thread (the kernel
  // delivers requests to the task that asked); the kernel holds every
  // request until all queues have entries, so a failure here fails the mount.
  Status started = Status::Ok();
  for (auto& w : pool->workers_) {
    Status ws = w->started.get_future().get();
    if (started.ok()) started = ws;
  }
  if (!started.ok()) {
    pool->Stop();
    return started;
  }
  *out = std::move(pool);
  return Status::Ok();
}

Status WorkerPool::ServeInit() {
  IoBufferPool& pool = fs_->buffers();
  IoBuffer* b = pool.Get();
  Status s = Status::Ok();
  for (;;) {
    pollfd p{fuse_fd_, POLLIN, 0};
    int rc = poll(&p, 1, 30000);
    if (rc == 0) {
      s = Status::IoError("the kernel sent no FUSE INIT within 30 s of the mount");
      break;
    }
    if (rc < 0 && errno == EINTR) continue;
    ssize_t n = read(fuse_fd_, b->base, b->size);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n < static_cast<ssize_t>(sizeof(fuse_in_header))) {
      s = Status::IoError(std::string("reading the FUSE INIT request failed: ") + (n < 0 ? strerror(errno) : "short"));
      break;
    }
    const auto* in = reinterpret_cast<const fuse_in_header*>(b->base);
    if (in->opcode != FUSE_INIT) {
      s = Status::IoError("the first FUSE request was not INIT (opcode " + std::to_string(in->opcode) + ")");
      break;
    }
    if (uring_) uring_->SawInit(b->base, static_cast<size_t>(n));
    fs_->fuse_stats().dev_requests.fetch_add(1, std::memory_order_relaxed);
    if (!Process(b->base, static_cast<size_t>(n))) s = Status::IoError("the FUSE INIT handshake failed");
    break;
  }
  pool.Put(b);
  return s;
}

WorkerPool::~WorkerPool() { Stop(); }

void WorkerPool::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (stop_fd_.valid()) Signal(stop_fd_.get());
  for (auto& w : workers_) {
    if (w->thread.joinable()) w->thread.join();
  }
  if (uring_) uring_->Close();  // the entry buffers go back while the pool exists
  fs_->UnregisterTaskWorks();
}

void WorkerPool::SessionOver() {
  fuse_session_exit(se_);
  Signal(exit_fd_.get());
}

void WorkerPool::Run(Worker* w) {
  pthread_setname_np(pthread_self(), "deferfs-worker");
  TaskWork::SetCurrent(&w->tw);
  w->recv = fs_->buffers().Get();  // kept while idle, whatever the transport
  if (w->ring) {
    const int fds[] = {fuse_fd_, w->tw.event_fd(), stop_fd_.get()};
    Status s = w->ring->Start(&w->tw, fds);
    w->tw.SetPlug(w->ring);
    const bool ok = s.ok();
    w->started.set_value(std::move(s));
    if (ok) RunRing(w);
  } else {
    w->started.set_value(Status::Ok());
    RunDev(w);
  }
  // IO may still be in flight with completions bound for this worker's
  // task_work, and replies bound for its ring (a dio leaves `inflight` just
  // before its reply): keep running it until every data request is answered.
  auto busy = [this] {
    return fs_->engine().stats().inflight.load(std::memory_order_acquire) > 0 ||
           fs_->gauges().fuse_requests.load(std::memory_order_acquire) > 0;
  };
  while (busy()) {
    if (w->tw.RunPending() == 0) {
      if (w->ring) w->ring->Flush();
      // A wakeup left unread (the loops read the eventfd only when it woke
      // them) would make this poll return at once: read it, or we spin.
      pollfd p{w->tw.event_fd(), POLLIN, 0};
      if (poll(&p, 1, 10) > 0) w->tw.ConsumeWakeup();
    }
  }
  w->tw.RunPending();
  if (w->ring) w->ring->Flush();
  w->tw.SetPlug(nullptr);
  if (w->recv) fs_->buffers().Put(w->recv);
}

void WorkerPool::RunDev(Worker* w) {
  bool stop = false;
  while (!stop) {
    // Completions first: they finish requests that are already paid for.
    w->tw.RunPending();
    DevRead r = ReadDev(w);
    if (r == DevRead::kOver) return;
    if (r == DevRead::kProcessed) continue;
    if (!w->tw.PrepareSleep()) continue;
    epoll_event evs[3];
    int ready = epoll_wait(w->epoll_fd.get(), evs, 3, -1);
    // The eventfd is read only when it fired: a request that woke us goes
    // straight to its read(2), one system call sooner.
    bool kicked = false;
    for (int i = 0; i < ready; i++) {
      stop |= evs[i].data.fd == stop_fd_.get();
      kicked |= evs[i].data.fd == w->tw.event_fd();
    }
    w->tw.Awake(/*consume=*/kicked);
  }
}

void WorkerPool::RunRing(Worker* w) {
  FuseRing::Event evs[16];
  for (;;) {
    // Completions first, as in RunDev; their replies join the next submit.
    w->tw.RunPending();
    size_t n = w->ring->Reap(false, evs);
    if (n == 0) {
      if (!w->tw.PrepareSleep()) {
        w->ring->Flush();
        continue;
      }
      n = w->ring->Reap(true, evs);  // sends the queued replies and sleeps: one io_uring_enter
      w->tw.Awake(/*consume=*/false);  // the eventfd is read when its poll fired
    } else {
      w->ring->Flush();  // the replies so far go out before this batch is served
    }
    for (size_t i = 0; i < n; i++) {
      const FuseRing::Event& ev = evs[i];
      switch (ev.kind) {
        case FuseRing::Event::kRequest: {
          RecvBufferSlot::Set(RecvBuffer{ev.payload, false});
          bool go_on = Process(ev.req, ev.len);
          RecvBufferSlot::Take();
          if (!go_on) return;
          break;
        }
        case FuseRing::Event::kFdReady:
          if (ev.fd == stop_fd_.get()) return;
          if (ev.fd == w->tw.event_fd()) {
            w->tw.ConsumeWakeup();  // RunPending runs what woke us
          } else if (ev.fd == fuse_fd_) {
            DevRead r;
            while ((r = ReadDev(w)) == DevRead::kProcessed) {
            }
            if (r == DevRead::kOver) return;
          }
          break;
        case FuseRing::Event::kClosed:
          if (ev.err != ENOTCONN) LogError("the kernel ended the FUSE ring: %s: the mount stops", strerror(ev.err));
          SessionOver();
          return;
      }
    }
  }
}

WorkerPool::DevRead WorkerPool::ReadDev(Worker* w) {
  if (w->recv == nullptr) w->recv = fs_->buffers().Get();
  uint8_t* req = w->recv->base + kPayloadAlign - kWriteHeaderBytes;
  ssize_t n = read(fuse_fd_, req, kRecvBytes);
  if (n > 0) {
    fs_->fuse_stats().dev_requests.fetch_add(1, std::memory_order_relaxed);
    RecvBufferSlot::Set(RecvBuffer{w->recv, true});
    bool go_on = Process(req, static_cast<size_t>(n));
    if (RecvBufferSlot::Take().buf == nullptr) w->recv = nullptr;  // an async write kept it
    return go_on ? DevRead::kProcessed : DevRead::kOver;
  }
  int err = n < 0 ? errno : ENODEV;
  if (err == EINTR || err == ENOENT) return DevRead::kProcessed;  // ENOENT: the request was interrupted
  if (err == EAGAIN) return DevRead::kEmpty;
  // ENODEV: unmounted. Anything else: the connection is unusable.
  if (err != ENODEV) LogError("reading the FUSE device failed: %s: the mount stops", strerror(err));
  SessionOver();
  return DevRead::kOver;
}

bool WorkerPool::Process(uint8_t* req, size_t len) {
  const auto* in = reinterpret_cast<const fuse_in_header*>(req);
  if (len >= sizeof(*in) && in->opcode == FUSE_SYNCFS) {
    // Linux forwards syncfs(2) to a FUSE server only for virtiofs so far
    // (fc->sync_fs), and libfuse 3.14 has no callback for it; should a kernel
    // send it, answer it here so syncfs(2) is a durability point.
    Status st = fs_->Sync();
    fuse_out_header out{sizeof(fuse_out_header), st.ok() ? 0 : -st.err(), in->unique};
    iovec iov{&out, sizeof(out)};
    FuseUring::Send(fuse_fd_, &iov, 1);  // a ring slot's request is answered there
    return true;
  }
  fuse_buf buf{};
  buf.mem = req;
  buf.size = len;
  fuse_session_process_buf(se_, &buf);
  return !fuse_session_exited(se_);
}

}  // namespace deferfs
