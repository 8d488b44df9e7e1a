// Superblock: the first 4 KiB of a backing device. It names the filesystem
// (magic, version, UUID) and its geometry; the metadata store is paired with
// it by UUID. Encode/Decode are pure; Decode validates everything it returns.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "backend/status.h"

namespace deferfs {

inline constexpr uint32_t kBlockSize = 4096;
inline constexpr uint64_t kSuperblockBytes = 4096;
inline constexpr uint32_t kFormatVersion = 1;
inline constexpr uint64_t kMinDeviceBytes = 16ull << 20;

using Uuid = std::array<uint8_t, 16>;

struct Superblock {
  Uuid uuid{};
  uint32_t version = kFormatVersion;
  uint32_t block_size = kBlockSize;
  uint64_t device_bytes = 0;   // bytes the filesystem uses
  uint64_t first_data_block = 1;  // block 0 holds this superblock
  int64_t created_ns = 0;

  uint64_t block_count() const { return device_bytes / block_size; }
};

// Random (version 4) UUID from the kernel's getrandom().
Uuid NewUuid();
std::string UuidToString(const Uuid& u);

// Writes `sb` into a kSuperblockBytes buffer.
void EncodeSuperblock(const Superblock& sb, uint8_t* out);
// Parses and checks magic, checksum, version and geometry; `what` names the
// device in error messages.
Status DecodeSuperblock(const uint8_t* in, const std::string& what, Superblock* sb);
// True if the buffer carries the deferfs magic (whatever its other fields).
bool HasSuperblockMagic(const uint8_t* in);

}  // namespace deferfs
