#include "backend/superblock.h"

#include <sys/random.h>

#include <cstdio>
#include <cstring>

#include "backend/crc32c.h"

namespace deferfs {
namespace {

constexpr char kMagic[8] = {'D', 'E', 'F', 'E', 'R', 'F', 'S', '1'};

// On-disk layout, little-endian (this is a host-endian x86-64/arm64 tool; the
// static_assert keeps the layout from drifting). crc covers bytes [0, crc).
struct OnDisk {
  char magic[8];
  uint32_t version;
  uint32_t block_size;
  uint8_t uuid[16];
  uint64_t device_bytes;
  uint64_t first_data_block;
  int64_t created_ns;
  uint32_t crc;
};
static_assert(sizeof(OnDisk) == 64);

}  // namespace

Uuid NewUuid() {
  Uuid u;
  size_t got = 0;
  while (got < u.size()) {
    ssize_t n = getrandom(u.data() + got, u.size() - got, 0);
    if (n > 0) got += static_cast<size_t>(n);
  }
  u[6] = (u[6] & 0x0f) | 0x40;
  u[8] = (u[8] & 0x3f) | 0x80;
  return u;
}

std::string UuidToString(const Uuid& u) {
  char s[37];
  std::snprintf(s, sizeof(s),
                "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11],
                u[12], u[13], u[14], u[15]);
  return s;
}

void EncodeSuperblock(const Superblock& sb, uint8_t* out) {
  std::memset(out, 0, kSuperblockBytes);
  OnDisk d{};
  std::memcpy(d.magic, kMagic, sizeof(kMagic));
  d.version = sb.version;
  d.block_size = sb.block_size;
  std::memcpy(d.uuid, sb.uuid.data(), sb.uuid.size());
  d.device_bytes = sb.device_bytes;
  d.first_data_block = sb.first_data_block;
  d.created_ns = sb.created_ns;
  d.crc = Crc32c(&d, offsetof(OnDisk, crc));
  std::memcpy(out, &d, sizeof(d));
}

bool HasSuperblockMagic(const uint8_t* in) {
  return std::memcmp(in, kMagic, sizeof(kMagic)) == 0;
}

Status DecodeSuperblock(const uint8_t* in, const std::string& what, Superblock* sb) {
  if (!HasSuperblockMagic(in)) {
    return Status::Invalid(what + " is not a deferfs filesystem (no superblock): format it with 'deferfs mkfs " + what + "'");
  }
  OnDisk d;
  std::memcpy(&d, in, sizeof(d));
  if (Crc32c(&d, offsetof(OnDisk, crc)) != d.crc) {
    return Status::Invalid(what + " has a corrupt deferfs superblock (checksum mismatch): run 'deferfs fsck " + what + "' or reformat it");
  }
  if (d.version != kFormatVersion) {
    return Status::Invalid(what + " has deferfs format version " + std::to_string(d.version) +
                           ", this deferfs reads version " + std::to_string(kFormatVersion) + ": use a matching deferfs");
  }
  if (d.block_size != kBlockSize || d.first_data_block < 1 || d.device_bytes < kMinDeviceBytes ||
      d.device_bytes % kBlockSize != 0) {
    return Status::Invalid(what + " has an inconsistent deferfs superblock (geometry): reformat it");
  }
  sb->version = d.version;
  sb->block_size = d.block_size;
  std::memcpy(sb->uuid.data(), d.uuid, sb->uuid.size());
  sb->device_bytes = d.device_bytes;
  sb->first_data_block = d.first_data_block;
  sb->created_ns = d.created_ns;
  return Status::Ok();
}

}  // namespace deferfs
