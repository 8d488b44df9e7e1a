#include "backend/fault_inject.h"

#include <cerrno>
#include <cstring>
#include <string_view>

namespace deferfs {
namespace {

// A tag with its NUL, so that no tag matches as a prefix of another.
template <size_t N>
constexpr std::string_view Tag(const char (&tag)[N]) {
  return std::string_view(tag, N);
}

bool Tagged(const uint8_t* block, std::string_view tag) { return std::memcmp(block, tag.data(), tag.size()) == 0; }

}  // namespace

bool InjectedFault(const Bio& bio, int32_t* result) {
  if (bio.op == Bio::Op::kFlush || bio.buf == nullptr) return false;
  const bool write = bio.op == Bio::Op::kWrite;
  const std::string_view eio = write ? Tag(kFaultEioWrite) : Tag(kFaultEioRead);
  const std::string_view short_io = write ? Tag(kFaultShortWrite) : Tag(kFaultShortRead);
  const auto* p = static_cast<const uint8_t*>(bio.buf);
  // A tail shorter than a block cannot hold a tagged block.
  for (uint32_t off = 0; off + kFaultBlockBytes <= bio.len; off += kFaultBlockBytes) {
    if (Tagged(p + off, eio)) {
      *result = -EIO;
      return true;
    }
    if (Tagged(p + off, short_io)) {
      *result = static_cast<int32_t>(bio.len / 2);
      return true;
    }
  }
  return false;
}

}  // namespace deferfs
