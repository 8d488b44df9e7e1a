// Iomap: how one file range maps to the device — the kernel's struct iomap.
// IomapOps::Begin is iomap_begin for deferfs: it answers one mapping at a
// time over an inode's extent map, and for writes turns holes into fresh
// allocations mapped UNWRITTEN+NEW. Those live in Inode::new_extents, in
// memory only, until the write's completion commits them (or frees them).
// Thread-safe; callers hold inode->mu around Begin.
#pragma once

#include <cstdint>
#include <functional>

#include "backend/allocator.h"
#include "backend/status.h"
#include "fs/inode.h"

namespace deferfs {

inline constexpr uint64_t kBlockShift = 12;

struct Iomap {
  enum Type : uint8_t { HOLE, MAPPED, UNWRITTEN };
  uint64_t offset = 0;  // file bytes
  uint64_t length = 0;  // bytes
  uint64_t addr = 0;    // device bytes; MAPPED and UNWRITTEN only
  Type type = HOLE;
  uint16_t flags = 0;
};

enum : uint16_t {
  IOMAP_F_NEW = 1,    // blocks allocated by this Begin
  IOMAP_F_DIRTY = 2,  // the inode has metadata that is not durable yet
};
enum : unsigned { IOMAP_WRITE = 1 };

class IomapOps {
 public:
  // `reclaim` is asked to make freed-but-not-yet-reusable blocks reusable
  // (a metadata sync) when the allocator runs dry; true if it found some.
  // `synced_epoch`: the WAL epoch known durable (Inode::meta_epoch).
  IomapOps(Allocator* alloc, std::function<bool()> reclaim, const std::atomic<uint64_t>* synced_epoch)
      : alloc_(alloc), reclaim_(std::move(reclaim)), synced_epoch_(synced_epoch) {}

  // The mapping at block-aligned `pos`, at most `len` bytes long. EAGAIN: a
  // write overlaps another write's in-flight allocation; wait for
  // Inode::dio_wq and retry (overlapping allocating writes serialize).
  // ENOSPC when the device is full.
  Status Begin(Inode* inode, uint64_t pos, uint64_t len, unsigned flags, Iomap* out);

 private:
  Allocator* const alloc_;
  const std::function<bool()> reclaim_;
  const std::atomic<uint64_t>* const synced_epoch_;
};

}  // namespace deferfs
