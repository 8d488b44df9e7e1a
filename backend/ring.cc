#include "backend/ring.h"

#include <cstring>
#include <string>

namespace deferfs {

namespace {

Status SetupError(int err, unsigned entries) {
  std::string what = "cannot create an io_uring with " + std::to_string(entries) +
                     " entries: " + std::strerror(err);
  if (err == EPERM) what += " (io_uring disabled? check /proc/sys/kernel/io_uring_disabled)";
  if (err == ENOMEM) what += " (locked-memory limit too low? raise 'ulimit -l')";
  return Status::Error(err, what);
}

}  // namespace

Status Ring::Create(unsigned entries, bool single_issuer, std::unique_ptr<Ring>* out) {
  struct io_uring ring;
  int rc = -EINVAL;
  if (single_issuer) {
    // COOP_TASKRUN: no IPI to run task_work; our owner enters the kernel
    // (submit or wait) every loop, which is where it runs.
    struct io_uring_params p;
    std::memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN;
    rc = io_uring_queue_init_params(entries, &ring, &p);
  }
  if (rc == -EINVAL) {  // kernel without those flags (< 6.0): plain ring
    struct io_uring_params p;
    std::memset(&p, 0, sizeof(p));
    rc = io_uring_queue_init_params(entries, &ring, &p);
  }
  if (rc < 0) return SetupError(-rc, entries);
  *out = std::make_unique<Ring>(Key(), ring);
  return Status::Ok();
}

Ring::~Ring() { io_uring_queue_exit(&ring_); }

Status Ring::RegisterFiles(std::span<const int> fds) {
  int rc = io_uring_register_files(&ring_, fds.data(), static_cast<unsigned>(fds.size()));
  if (rc < 0) {
    return Status::Error(-rc, std::string("io_uring_register_files failed: ") + std::strerror(-rc));
  }
  return Status::Ok();
}

Status Ring::RegisterBuffers(std::span<const struct iovec> bufs) {
  int rc = io_uring_register_buffers(&ring_, bufs.data(), static_cast<unsigned>(bufs.size()));
  if (rc < 0) {
    std::string what = std::string("io_uring_register_buffers failed: ") + std::strerror(-rc);
    if (rc == -ENOMEM) what += " (buffers are pinned: raise 'ulimit -l')";
    return Status::Error(-rc, what);
  }
  return Status::Ok();
}

}  // namespace deferfs
