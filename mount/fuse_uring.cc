#include "mount/fuse_uring.h"

#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <charconv>
#include <cstring>
#include <fstream>
#include <string>

#include "backend/log.h"

namespace deferfs {

// One kernel request slot. The pool buffer holds, in order: room for the
// request's headers as read(2) would give them, then the payload the kernel
// fills (a WRITE's data lands page-aligned, a READ's reply is read into it).
struct FuseRingEntry {
  TaskWorkCallback commit_work;  // first: CommitWork gets from it to the entry
  FuseRing* ring = nullptr;
  uint16_t qid = 0;
  uint64_t unique = 0;  // of the request being served
  fuse_abi::UringReqHeader header{};
  IoBuffer* buf = nullptr;
  IoBuffer payload;  // buf past the headers' room; same registered index
  iovec iov[2]{};
};
static_assert(std::is_standard_layout_v<FuseRingEntry>);

namespace {

// The headers' room: a page, so the payload stays page-aligned.
constexpr size_t kHeadRoom = 4096;
static_assert(sizeof(fuse_in_header) + sizeof(fuse_abi::UringReqHeader::op_in) <= kHeadRoom);

// Tags of the polls in user_data; entries are pointers (8-byte aligned), fds are odd.
uint64_t FdTag(int fd) { return (static_cast<uint64_t>(fd) << 1) | 1; }
bool IsFdTag(uint64_t tag) { return tag & 1; }
int TagFd(uint64_t tag) { return static_cast<int>(tag >> 1); }

std::atomic<FuseUring*> instance{nullptr};

void PrepCmd(io_uring_sqe* sqe, int fuse_fd, uint32_t op, const FuseRingEntry* e, uint64_t commit_id) {
  std::memset(sqe, 0, 2 * sizeof(*sqe));  // an SQE128 slot
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = fuse_fd;
  sqe->cmd_op = op;
  fuse_abi::UringCmdReq req{};
  req.commit_id = commit_id;
  req.qid = e->qid;
  std::memcpy(sqe->cmd, &req, sizeof(req));
  io_uring_sqe_set_data(sqe, const_cast<FuseRingEntry*>(e));
}


}  // namespace

bool FuseUring::KernelEnabled() {
  // The module (and so its parameter) may not be loaded yet: opening the
  // device loads it, as mounting would.
  if (access("/sys/module/fuse", F_OK) != 0) {
    int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fd >= 0) close(fd);
  }
  std::ifstream f("/sys/module/fuse/parameters/enable_uring");
  char c = 0;
  return f >> c && (c == 'Y' || c == 'y' || c == '1');
}

unsigned FuseUring::KernelQueues() {
  // num_possible_cpus(): "/sys/devices/system/cpu/possible" is "0-N" (or a list).
  std::ifstream f("/sys/devices/system/cpu/possible");
  std::string s;
  unsigned last = 0;
  if (f >> s) {
    size_t cut = s.find_last_of("-,");
    const char* p = s.c_str() + (cut == std::string::npos ? 0 : cut + 1);
    std::from_chars(p, s.c_str() + s.size(), last);
  }
  return last + 1;
}

unsigned FuseUring::DefaultDepth(unsigned queues) { return std::clamp(256 / std::max(queues, 1u), 4u, 32u); }

FuseUring::FuseUring(fuse_session* se, IoBufferPool* pool, FuseTransportStats* stats, size_t nentries)
    : se_(se), pool_(pool), stats_(stats), serving_(nentries) {}

Status FuseUring::Create(fuse_session* se, IoBufferPool* pool, FuseTransportStats* stats, unsigned workers,
                         unsigned depth, std::unique_ptr<FuseUring>* out) {
  const unsigned queues = KernelQueues();
  const unsigned nentries = queues * depth;
  if (pool->buffer_size() < kHeadRoom + kMaxIo) return Status::Invalid("FUSE ring buffers too small");
  auto t = std::make_unique<FuseUring>(se, pool, stats, nentries);
  workers = std::min(workers, queues);
  for (unsigned w = 0; w < workers; w++) {
    t->rings_.push_back(std::make_unique<FuseRing>(t.get(), (queues + workers - 1 - w) / workers * depth));
  }
  for (unsigned q = 0; q < queues; q++) {
    FuseRing* r = t->rings_[q % workers].get();
    for (unsigned d = 0; d < depth; d++) {
      auto e = std::make_unique<FuseRingEntry>();
      e->ring = r;
      e->qid = static_cast<uint16_t>(q);
      e->commit_work.func = &FuseRing::CommitWork;
      e->buf = pool->Get();
      stats->ring_buffers.fetch_add(1, std::memory_order_relaxed);
      e->payload = IoBuffer{e->buf->base + kHeadRoom, e->buf->size - kHeadRoom, e->buf->index};
      e->iov[0] = {&e->header, sizeof(e->header)};
      e->iov[1] = {e->payload.base, e->payload.size};
      r->entries_.push_back(std::move(e));
    }
  }

  FuseUring* expected = nullptr;
  if (!instance.compare_exchange_strong(expected, t.get())) {
    t->Close();
    return Status::Invalid("one FUSE ring transport per process");
  }
  static const fuse_custom_io io = {&WritevHook, &ReadHook, nullptr, nullptr};
  int rc = fuse_session_custom_io(se, &io, fuse_session_fd(se));
  if (rc != 0) {
    t->Close();
    return Status::IoError(std::string("cannot route FUSE replies: ") + strerror(-rc));
  }
  *out = std::move(t);
  return Status::Ok();
}

FuseUring::~FuseUring() {
  Close();
  FuseUring* self = this;
  instance.compare_exchange_strong(self, nullptr);
}

void FuseUring::Close() {
  for (auto& r : rings_) {
    if (r->ring_ok_) io_uring_queue_exit(&r->ring_);
    r->ring_ok_ = false;
    for (auto& e : r->entries_) {
      if (e->buf == nullptr) continue;
      pool_->Put(e->buf);
      stats_->ring_buffers.fetch_sub(1, std::memory_order_relaxed);
      e->buf = nullptr;
    }
  }
  negotiated_.store(false, std::memory_order_release);
}

void FuseUring::SawInit(const uint8_t* req, size_t len) {
  fuse_in_header in;
  fuse_init_in arg{};
  if (len < sizeof(in) + 16) return;
  std::memcpy(&in, req, sizeof(in));
  std::memcpy(&arg, req + sizeof(in), std::min(len - sizeof(in), sizeof(arg)));
  uint64_t flags = arg.flags;
  if ((arg.flags & FUSE_INIT_EXT) && len >= sizeof(in) + sizeof(arg)) flags |= uint64_t{arg.flags2} << 32;
  init_offered_.store((flags & fuse_abi::kOverIoUring) != 0, std::memory_order_relaxed);
  init_unique_.store(in.unique, std::memory_order_release);
}

// libfuse 3.14 knows no INIT flag past bit 31 but echoes FUSE_INIT_EXT, so the
// reply has flags2; asking for io_uring is one more bit there.
void FuseUring::PatchInitReply(iovec* iov, int count) {
  if (!init_offered_.load(std::memory_order_relaxed) || count < 2) return;
  if (iov[1].iov_len < fuse_abi::kInitOutFlags2 + sizeof(uint32_t)) return;
  auto* out = static_cast<uint8_t*>(iov[1].iov_base);
  uint32_t flags, flags2;
  std::memcpy(&flags, out + fuse_abi::kInitOutFlags, sizeof(flags));
  std::memcpy(&flags2, out + fuse_abi::kInitOutFlags2, sizeof(flags2));
  flags |= fuse_abi::kInitExt;
  flags2 |= static_cast<uint32_t>(fuse_abi::kOverIoUring >> 32);
  std::memcpy(out + fuse_abi::kInitOutFlags, &flags, sizeof(flags));
  std::memcpy(out + fuse_abi::kInitOutFlags2, &flags2, sizeof(flags2));
  negotiated_.store(true, std::memory_order_release);
}

ssize_t FuseUring::Send(int fd, iovec* iov, int count) {
  FuseUring* t = instance.load(std::memory_order_acquire);
  return t ? t->Writev(fd, iov, count) : writev(fd, iov, count);
}

ssize_t FuseUring::WritevHook(int fd, iovec* iov, int count, void*) { return Send(fd, iov, count); }

ssize_t FuseUring::ReadHook(int fd, void* buf, size_t len, void*) { return read(fd, buf, len); }

ssize_t FuseUring::Writev(int fd, iovec* iov, int count) {
  fuse_out_header out;
  if (count < 1 || iov[0].iov_len < sizeof(out)) return writev(fd, iov, count);
  std::memcpy(&out, iov[0].iov_base, sizeof(out));
  const uint64_t init = init_unique_.load(std::memory_order_acquire);
  if (init != 0 && out.unique == init) {
    PatchInitReply(iov, count);
    init_unique_.store(0, std::memory_order_relaxed);
  }
  // Notifications (unique 0), interrupt replies and requests that came by
  // read(2) (FORGET, INTERRUPT, anything before the rings were ready) have
  // no entry: they go back through /dev/fuse.
  FuseRingEntry* e = out.unique ? serving_.Take(out.unique) : nullptr;
  if (e == nullptr) return writev(fd, iov, count);

  size_t n = 0;
  size_t copied = 0;
  for (int i = 1; i < count; i++) {
    if (n + iov[i].iov_len > e->payload.size) {  // cannot happen within max_write; fail the request, not us
      out.error = -EIO;
      n = 0;
      break;
    }
    // A read reply was read into the payload already: nothing to move.
    if (iov[i].iov_base != e->payload.base + n) {
      std::memmove(e->payload.base + n, iov[i].iov_base, iov[i].iov_len);
      copied += iov[i].iov_len;
    }
    n += iov[i].iov_len;
  }
  if (copied != 0) stats_->ring_copied_bytes.fetch_add(copied, std::memory_order_relaxed);
  out.len = static_cast<uint32_t>(sizeof(out) + n);
  std::memcpy(e->header.in_out, &out, sizeof(out));
  e->header.ring_ent_in_out.payload_sz = static_cast<uint32_t>(n);
  FuseRing* r = e->ring;
  if (TaskWork::Current() == r->owner_) {
    r->Commit(e);
  } else {
    stats_->remote_commits.fetch_add(1, std::memory_order_relaxed);
    r->owner_->Add(&e->commit_work);
  }
  return static_cast<ssize_t>(out.len);
}

FuseRing::FuseRing(FuseUring* t, unsigned nentries) : t_(t) { entries_.reserve(nentries); }

FuseRing::~FuseRing() {
  if (ring_ok_) io_uring_queue_exit(&ring_);
}

Status FuseRing::Start(TaskWork* owner, std::span<const int> fds) {
  owner_ = owner;
  // Only the owner submits; the kernel copies each request into the entry's
  // buffers in the task that submitted its command, i.e. here.
  io_uring_params p{};
  p.flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
  // Room for every entry's command and every poll at once: a commit never finds the SQ full.
  const unsigned depth = std::bit_ceil(static_cast<unsigned>(entries_.size() + fds.size() + 1));
  int rc = io_uring_queue_init_params(depth, &ring_, &p);
  if (rc < 0) return Status::IoError(std::string("cannot create a FUSE ring: ") + strerror(-rc));
  ring_ok_ = true;
  fuse_fd_ = fuse_session_fd(t_->se_);
  for (auto& e : entries_) Register(e.get());
  for (int fd : fds) ArmPoll(fd);
  rc = io_uring_submit(&ring_);
  Status s = rc < 0 ? Status::IoError(std::string("cannot register FUSE ring entries: ") + strerror(-rc)) : Status::Ok();
  // A refused registration completes at once; a good one only with a request.
  io_uring_cqe* cqe;
  unsigned head;
  io_uring_for_each_cqe(&ring_, head, cqe) {
    if (s.ok() && !IsFdTag(cqe->user_data) && cqe->res < 0) {
      s = Status::IoError(std::string("the kernel refused a FUSE ring entry: ") + strerror(-cqe->res));
    }
  }
  if (!s.ok()) {  // nothing of this ring may be submitted later
    io_uring_queue_exit(&ring_);
    ring_ok_ = false;
  }
  return s;
}

// The SQ has room for every entry's command and every poll at once (Start),
// so this never waits; submitting first would only be a fallback.
io_uring_sqe* FuseRing::GetSqe() {
  io_uring_sqe* sqe;
  while ((sqe = io_uring_get_sqe(&ring_)) == nullptr) io_uring_submit(&ring_);
  return sqe;
}

void FuseRing::ArmPoll(int fd) {
  io_uring_sqe* sqe = GetSqe();
  io_uring_prep_poll_multishot(sqe, fd, POLLIN);
  io_uring_sqe_set_data64(sqe, FdTag(fd));
}

void FuseRing::Register(FuseRingEntry* e) {
  io_uring_sqe* sqe = GetSqe();
  PrepCmd(sqe, fuse_fd_, fuse_abi::kCmdRegister, e, 0);
  sqe->addr = reinterpret_cast<uint64_t>(e->iov);  // the header and payload buffers
  sqe->len = 2;
}

void FuseRing::Commit(FuseRingEntry* e) {
  io_uring_sqe* sqe = GetSqe();
  PrepCmd(sqe, fuse_fd_, fuse_abi::kCmdCommitAndFetch, e, e->unique);
}

void FuseRing::CommitWork(TaskWorkCallback* cb) {
  auto* e = reinterpret_cast<FuseRingEntry*>(cb);
  e->ring->Commit(e);
}

void FuseRing::Flush() {
  if (ring_ok_ && io_uring_sq_ready(&ring_) > 0) io_uring_submit(&ring_);
}

// Ends the ring's service: the events so far, then kClosed.
size_t FuseRing::Closed(std::span<Event> out, size_t n, int err) {
  closed_ = true;
  out[n] = Event{};
  out[n].kind = Event::kClosed;
  out[n].err = err;
  return n + 1;
}

size_t FuseRing::Reap(bool wait, std::span<Event> out) {
  if (closed_ || !ring_ok_) return 0;
  if (wait) {
    // What is queued goes out with the wait: one io_uring_enter.
    int rc;
    do {
      rc = io_uring_submit_and_wait(&ring_, 1);
    } while (rc == -EINTR);
    if (rc < 0 && rc != -EAGAIN && rc != -EBUSY) return Closed(out, 0, -rc);
  }
  // Without waiting this only enters the kernel to run task_work that holds
  // requests (COOP_TASKRUN) or to flush an overflowed CQ.
  size_t n = 0;
  io_uring_cqe* cqe;
  while (n < out.size() && io_uring_peek_cqe(&ring_, &cqe) == 0) {
    const uint64_t tag = cqe->user_data;
    const int res = cqe->res;
    const bool more = cqe->flags & IORING_CQE_F_MORE;
    io_uring_cqe_seen(&ring_, cqe);
    Event& ev = out[n];
    if (IsFdTag(tag)) {
      if (res < 0) return Closed(out, n, -res);  // a wakeup could be lost: stop cleanly instead
      if (!more) ArmPoll(TagFd(tag));  // the kernel ended the multishot poll
      ev = Event{};
      ev.kind = Event::kFdReady;
      ev.fd = TagFd(tag);
      n++;
      continue;
    }
    auto* e = reinterpret_cast<FuseRingEntry*>(tag);
    if (res == -EAGAIN || res == -EINTR) {  // not taken: send the same command again
      if (e->unique) Commit(e);
      else Register(e);
      continue;
    }
    if (res < 0) return Closed(out, n, -res);  // ENOTCONN: unmounted or aborted; the kernel ends every entry so
    // A request: rebuild the read(2) layout (fuse_in_header, the first
    // argument, the rest) in the room before the payload, which stays put.
    fuse_in_header in;
    std::memcpy(&in, e->header.in_out, sizeof(in));
    const size_t payload = e->header.ring_ent_in_out.payload_sz;
    const size_t op_size = in.len - sizeof(in) - payload;  // the kernel's len counts every argument
    if (in.len < sizeof(in) + payload || op_size > sizeof(e->header.op_in) || payload > e->payload.size) {
      LogError("FUSE ring: malformed request (opcode %u, len %u, payload %zu): answered EIO", in.opcode, in.len,
               payload);
      fuse_out_header reply{sizeof(fuse_out_header), -EIO, in.unique};
      std::memcpy(e->header.in_out, &reply, sizeof(reply));
      e->header.ring_ent_in_out.payload_sz = 0;
      e->unique = in.unique;
      Commit(e);
      continue;
    }
    uint8_t* req = e->payload.base - op_size - sizeof(in);
    std::memcpy(req, &in, sizeof(in));
    std::memcpy(req + sizeof(in), e->header.op_in, op_size);
    e->unique = in.unique;
    t_->serving_.Insert(in.unique, e);
    t_->stats_->ring_requests.fetch_add(1, std::memory_order_relaxed);
    ev = Event{};
    ev.kind = Event::kRequest;
    ev.req = req;
    ev.len = in.len;
    ev.payload = &e->payload;
    n++;
  }
  return n;
}

}  // namespace deferfs
