// CRC-32C (Castagnoli), the checksum of the superblock. Pure function.
#pragma once

#include <cstddef>
#include <cstdint>

namespace deferfs {

uint32_t Crc32c(const void* data, size_t len);

}  // namespace deferfs
