// The kernel's FUSE-over-io_uring ABI (include/uapi/linux/fuse.h, protocol
// 7.42, Linux 6.14+), which Debian 12's headers (7.38) predate. Layouts are
// the kernel's; the static_asserts pin them.
#pragma once

#include <cstddef>
#include <cstdint>

namespace deferfs::fuse_abi {

// INIT flag, bit 41: in flags2 (bits 32-63), which the kernel reads only
// when the reply's flags carry FUSE_INIT_EXT.
inline constexpr uint64_t kOverIoUring = uint64_t{1} << 41;
inline constexpr uint32_t kInitExt = uint32_t{1} << 30;
// fuse_init_out: flags at byte 12, flags2 at byte 32.
inline constexpr size_t kInitOutFlags = 12;
inline constexpr size_t kInitOutFlags2 = 32;

// io_uring command ops on /dev/fuse (sqe->cmd_op).
inline constexpr uint32_t kCmdRegister = 1;        // FUSE_IO_URING_CMD_REGISTER
inline constexpr uint32_t kCmdCommitAndFetch = 2;  // FUSE_IO_URING_CMD_COMMIT_AND_FETCH

struct UringEntInOut {  // struct fuse_uring_ent_in_out
  uint64_t flags;
  uint64_t commit_id;  // the request's unique
  uint32_t payload_sz;
  uint32_t padding;
  uint64_t reserved;
};

// struct fuse_uring_req_header: an entry's header buffer (iov[0] at REGISTER).
struct UringReqHeader {
  uint8_t in_out[128];  // fuse_in_header of the request, then our fuse_out_header
  uint8_t op_in[128];   // the request's first argument (fuse_read_in, ...), if any
  UringEntInOut ring_ent_in_out;
};

// struct fuse_uring_cmd_req, in the SQE's command area (IORING_SETUP_SQE128).
struct UringCmdReq {
  uint64_t flags;
  uint64_t commit_id;
  uint16_t qid;
  uint8_t padding[6];
};

static_assert(sizeof(UringEntInOut) == 32);
static_assert(sizeof(UringReqHeader) == 288 && offsetof(UringReqHeader, ring_ent_in_out) == 256);
static_assert(sizeof(UringCmdReq) == 24);

}  // namespace deferfs::fuse_abi
