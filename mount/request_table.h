// RequestTable: unique -> T* for the FUSE requests being served, in a fixed
// array (nothing allocated per request): open addressing with linear probing
// and backward-shift deletion. Holds at most half its slots' worth (the
// capacity asked for); unique 0 is never a request. Thread-safe.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

namespace deferfs {

template <typename T>
class RequestTable {
 public:
  explicit RequestTable(size_t capacity)
      : slots_(std::bit_ceil(2 * std::max<size_t>(capacity, 1)), {0, nullptr}),
        shift_(64 - std::countr_zero(slots_.size())) {}

  // `unique` must not be in the table, which must have room (capacity).
  void Insert(uint64_t unique, T* value) {
    std::lock_guard l(mu_);
    size_t i = Home(unique);
    while (slots_[i].first != 0) i = Next(i);
    slots_[i] = {unique, value};
  }

  // Removes `unique` and returns its value; nullptr if it is not there.
  T* Take(uint64_t unique) {
    std::lock_guard l(mu_);
    size_t i = Home(unique);
    while (slots_[i].first != unique) {
      if (slots_[i].first == 0) return nullptr;
      i = Next(i);
    }
    T* value = slots_[i].second;
    // Backward shift: move up each later key of the run whose home is not
    // between the hole and itself, so no lookup stops at the hole early.
    for (size_t j = Next(i); slots_[j].first != 0; j = Next(j)) {
      const size_t home = Home(slots_[j].first);
      const bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
      if (stays) continue;
      slots_[i] = slots_[j];
      i = j;
    }
    slots_[i] = {0, nullptr};
    return value;
  }

 private:
  // Fibonacci hashing, the product's top bits: the kernel's uniques step by
  // two, so a product's low bit is always zero.
  size_t Home(uint64_t unique) const { return static_cast<size_t>((unique * 0x9E3779B97F4A7C15ull) >> shift_); }
  size_t Next(size_t i) const { return (i + 1) & (slots_.size() - 1); }

  std::mutex mu_;
  std::vector<std::pair<uint64_t, T*>> slots_;  // guarded by mu_; key 0: free
  const int shift_;
};

}  // namespace deferfs
