// Bio: one device IO, as handed from a FUSE worker to a poller.
// The submitter fills it and owns its memory until end_io runs; end_io runs
// exactly once, on the poller thread, with `result` set.
#pragma once

#include <cstdint>

namespace deferfs {

struct Bio {
  enum class Op : uint8_t { kRead, kWrite, kFlush };

  Op op = Op::kRead;
  uint64_t dev_offset = 0;   // bytes; aligned to the device's DIO alignment
  void* buf = nullptr;       // aligned to the device's DIO alignment
  uint32_t len = 0;          // bytes; a multiple of the DIO alignment
  int buf_index = -1;        // registered buffer holding `buf`, or -1
  bool fua = false;          // writes: on stable media when complete (RWF_DSYNC)

  // Bytes transferred (== len on success) or -errno. Set before end_io.
  int32_t result = 0;
  void (*end_io)(Bio* bio) = nullptr;
  void* private_data = nullptr;  // for end_io: usually the owning Dio

  Bio* next = nullptr;  // intrusive link for the poller's inbound queue
};

}  // namespace deferfs
