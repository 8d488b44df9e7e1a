// Ring: one io_uring instance (SQ + CQ) with its registered files and buffers.
// Plain helpers in liburing's own idiom; no policy. Not thread-safe: one owner.
#pragma once

#include <liburing.h>
#include <sys/uio.h>

#include <memory>
#include <span>

#include "backend/status.h"

namespace deferfs {

class Ring {
 public:
  // `entries` SQ slots (the kernel sizes the CQ at 2x). With `single_issuer`
  // the calling thread becomes the only thread allowed to submit (and must
  // also be the one that registers); kernels that reject the flags get a
  // plain ring instead, so callers must not depend on the flag being set.
  static Status Create(unsigned entries, bool single_issuer, std::unique_ptr<Ring>* out);

  class Key {  // only Create() can construct a Ring
    friend class Ring;
    Key() = default;
  };
  Ring(Key, const struct io_uring& ring) : ring_(ring) {}
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  struct io_uring* raw() { return &ring_; }
  unsigned sq_entries() const { return ring_.sq.ring_entries; }
  unsigned cq_entries() const { return ring_.cq.ring_entries; }
  unsigned setup_flags() const { return ring_.flags; }

  // Fixed-file index i is fds[i]; use IOSQE_FIXED_FILE with the index.
  Status RegisterFiles(std::span<const int> fds);
  // Buffer index i is bufs[i]; pinned until the ring is destroyed.
  Status RegisterBuffers(std::span<const struct iovec> bufs);

  // A free SQE or nullptr when the SQ is full (Submit() frees it).
  struct io_uring_sqe* GetSqe() { return io_uring_get_sqe(&ring_); }
  unsigned SqSpaceLeft() const { return io_uring_sq_space_left(&ring_); }
  // Hands every prepared SQE to the kernel: count submitted or -errno.
  int Submit() { return io_uring_submit(&ring_); }
  int SubmitAndWait(unsigned wait_nr) { return io_uring_submit_and_wait(&ring_, wait_nr); }

  // Blocks until at least one CQE is available without consuming it;
  // 0 or -errno (-EINTR when a signal arrived first).
  int WaitCqe() {
    struct io_uring_cqe* cqe = nullptr;
    return io_uring_wait_cqe(&ring_, &cqe);
  }

  // Calls fn(user_data, res) for every CQE available, including those posted
  // while it runs, consuming each before its fn: fn may prepare and submit
  // new SQEs (their CQEs find the room) but must not reap.
  template <class Fn>
  unsigned Reap(Fn&& fn) {
    unsigned n = 0;
    unsigned head;
    struct io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_, head, cqe) {  // re-reads the tail each step
      const uint64_t user_data = cqe->user_data;
      const int res = cqe->res;
      io_uring_cq_advance(&ring_, 1);  // khead follows `head`
      fn(user_data, res);
      ++n;
    }
    return n;
  }

 private:
  struct io_uring ring_;
};

}  // namespace deferfs
