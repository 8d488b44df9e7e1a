#include "mount/progress.h"

#include <unistd.h>

#include <cstdio>
#include <utility>

namespace deferfs {

Progress::Progress(std::string what, uint64_t total)
    : what_(std::move(what)), total_(total), enabled_(total > 0 && isatty(STDERR_FILENO) == 1) {}

Progress::~Progress() {
  if (drawn_) std::fputc('\n', stderr);
}

void Progress::Update(uint64_t done) {
  if (!enabled_) return;
  int percent = static_cast<int>(done >= total_ ? 100 : done * 100 / total_);
  if (percent == last_percent_) return;
  last_percent_ = percent;
  constexpr double kGiB = 1 << 30;
  // \r and erase-to-end-of-line: the shorter new line leaves no residue.
  std::fprintf(stderr, "\rdeferfs: %s: %3d%% (%.1f of %.1f GiB)\033[K", what_.c_str(), percent,
               static_cast<double>(done) / kGiB, static_cast<double>(total_) / kGiB);
  std::fflush(stderr);
  drawn_ = true;
}

}  // namespace deferfs
