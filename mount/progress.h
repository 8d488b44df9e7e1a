// Progress: a "deferfs: <what>: 42% (1.7 of 4.0 GiB)" line on stderr, redrawn
// in place, for long commands; silent unless stderr is a terminal. Thread-compatible.
#pragma once

#include <cstdint>
#include <string>

namespace deferfs {

class Progress {
 public:
  // `total` is in bytes; 0 draws nothing.
  Progress(std::string what, uint64_t total);
  ~Progress();  // ends the line if one was drawn
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // `done` bytes of `total` are finished; redraws when the percentage moves.
  void Update(uint64_t done);

  bool shown() const { return enabled_; }

 private:
  std::string what_;
  uint64_t total_;
  bool enabled_;
  bool drawn_ = false;
  int last_percent_ = -1;
};

}  // namespace deferfs
