// Poller: one thread that owns one io_uring ring and plays device + IRQ:
// it takes bios from an inbound queue, submits them, reaps, runs end_io.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include "backend/bio.h"
#include "backend/device.h"
#include "backend/status.h"

namespace deferfs {

class Ring;
class UndoLog;

struct PollerOptions {
  unsigned ring_depth = 128;         // SQ entries (at least 2); the CQ gets twice that
  std::vector<struct iovec> buffers;  // registered at start; Bio::buf_index indexes it
  bool fault_inject = false;          // testing only: fail tagged bios (backend/fault_inject.h)
};

// Submit() is thread-safe and lock-free; end_io runs on the poller thread,
// exactly once per bio. Create/destroy by one owner; stats() from any thread.
class Poller {
 public:
  // Starts the thread, which creates the ring (single issuer when the kernel
  // allows) and registers dev.fd() and opt.buffers. `dev` must outlive the
  // Poller; so must the registered buffers.
  static Status Create(const Device& dev, const PollerOptions& opt,
                       std::unique_ptr<Poller>* out);
  // Completes every bio submitted before the call (end_io runs for each),
  // then joins. No Submit() may start once destruction has begun.
  ~Poller();

  // Queues `bio` (filled per bio.h) and wakes the poller only if it sleeps.
  // No lock, no allocation. Bios from one thread are issued in Submit order.
  // A bio not aligned to dev.dio_align(), of length 0, or with a buf_index
  // outside opt.buffers completes with -EINVAL without reaching the kernel.
  // With opt.fault_inject, tagged bios complete with the injected result.
  // With an undo log on `dev`, writes and flushes are logged as they are
  // issued and complete.
  void Submit(Bio* bio);

  struct Stats {
    uint64_t submitted;        // Submit() calls
    uint64_t completed;        // end_io calls started
    uint64_t wakeups_made;     // Submit() found the poller asleep: eventfd written
    uint64_t wakeups_avoided;  // Submit() found it awake: no syscall
    uint64_t sleeps;           // times the poller blocked waiting for a CQE
    uint64_t submit_batches;   // io_uring_enter calls made only to submit (a sleep submits with its wait)
  };
  // Relaxed snapshot: exact only when no IO is in flight.
  Stats stats() const;

 private:
  class Key {
    friend class Poller;
    Key() = default;
  };

 public:
  Poller(Key, const Device& dev, UniqueFd event_fd, PollerOptions opt);
  Poller(const Poller&) = delete;
  Poller& operator=(const Poller&) = delete;

 private:
  // One in-flight bio; user_data of its SQE is the slot index. A bio keeps
  // its slot across short-transfer continuations.
  struct Slot {
    Bio* bio = nullptr;
    uint32_t done = 0;  // bytes transferred so far
    uint32_t next = 0;  // free list / retry list link
    uint64_t undo_seq = 0;  // with an undo log: the write's or flush's name in it
  };
  static constexpr uint32_t kNoSlot = UINT32_MAX;
  static constexpr uint64_t kEventTag = UINT64_MAX;  // user_data of the eventfd read

  void ThreadMain(std::promise<Status>* ready);
  Status Setup();
  void Run();
  unsigned Reap();
  void DrainInbound();
  bool Valid(const Bio& bio) const;
  void Issue();
  bool PrepSlot(uint32_t idx);
  bool PrepEventRead();
  void SubmitBatch();
  void OnCqe(uint64_t user_data, int res);
  void EndIo(uint32_t idx, int32_t result);
  bool Idle() const;
  void WriteEventFd();

  const int dev_fd_;
  const uint32_t dio_align_;  // power of two
  UndoLog* const undo_log_;   // testing only: nullptr unless the Device keeps one
  const UniqueFd event_fd_;  // EFD_NONBLOCK: the ring polls it, never blocks on it
  const PollerOptions opt_;

  // Shared with submitters. inbound_ is a LIFO stack of bios linked by
  // Bio::next; the poller takes it whole and reverses it. inbound_ and
  // sleeping_ form a Dekker pair (seq_cst on both sides): a Submit either
  // sees sleeping_ and writes the eventfd, or the poller sees the bio when
  // it re-checks inbound_ after raising sleeping_.
  alignas(64) std::atomic<Bio*> inbound_{nullptr};
  std::atomic<bool> sleeping_{false};
  std::atomic<uint64_t> submitted_{0};
  std::atomic<uint64_t> wakeups_made_{0};
  std::atomic<bool> stop_{false};

  // Poller thread only (written before the thread starts or by it).
  alignas(64) std::unique_ptr<Ring> ring_;
  std::vector<Slot> slots_;      // cq_entries - 1: in flight never exceeds the CQ
  uint32_t free_head_ = kNoSlot;
  uint32_t busy_ = 0;            // slots in use
  uint32_t retry_head_ = kNoSlot, retry_tail_ = kNoSlot;  // short transfers to continue
  Bio* pending_head_ = nullptr;  // drained but not yet issued, FIFO
  Bio* pending_tail_ = nullptr;
  bool event_armed_ = false;
  uint64_t event_buf_ = 0;       // target of the armed eventfd read

  // Written by the poller thread only; atomic so stats() can read them.
  std::atomic<uint64_t> completed_{0};
  std::atomic<uint64_t> sleeps_{0};
  std::atomic<uint64_t> submit_batches_{0};

  std::thread thread_;  // last: joined in ~Poller before any member dies
};

}  // namespace deferfs
