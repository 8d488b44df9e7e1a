// The kernel's FUSE-over-io_uring switch, for tests of transport=uring.
#pragma once

#include <fcntl.h>
#include <sys/file.h>

#include <cstdlib>
#include <fstream>

#include <gtest/gtest.h>

#include "tests/mount/mounted_fs.h"

namespace deferfs_test {

inline constexpr const char* kSwitch = "/sys/module/fuse/parameters/enable_uring";

// Sets the kernel's FUSE-over-io_uring switch for the test's lifetime and
// puts back what it was. The switch is machine-wide and ctest runs tests in
// parallel processes: each holder takes an flock on the switch itself first,
// so one test cannot turn it off under another, or restore a value another
// had set.
class KernelUringSwitch {
 public:
  explicit KernelUringSwitch(bool on) : lock_(open(kSwitch, O_RDONLY | O_CLOEXEC)) {
    if (!lock_.ok()) return;
    while (flock(lock_.get(), LOCK_EX) != 0 && errno == EINTR) {
    }
    std::ifstream in(kSwitch);
    char c = 0;
    if (!(in >> c)) return;
    present_ = true;
    was_ = c;
    ok_ = Write(on ? 'Y' : 'N');
  }
  ~KernelUringSwitch() {
    if (present_) Write(was_);
  }
  bool present() const { return present_; }
  bool ok() const { return ok_; }

 private:
  static bool Write(char c) {
    std::ofstream out(kSwitch);
    out << c << '\n';
    out.flush();
    return out.good();
  }
  UniqueFd lock_;  // closed, and so unlocked, only after ~KernelUringSwitch restored the switch
  bool present_ = false, ok_ = false;
  char was_ = 'N';
};

#define SKIP_WITHOUT_KERNEL_SUPPORT(sw)                                                               \
  do {                                                                                                 \
    if (getenv("DEFERFS_TEST_DIR") != nullptr) GTEST_SKIP() << "needs deferfs itself";                \
    if (!(sw).present()) GTEST_SKIP() << "this kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)"; \
    ASSERT_TRUE((sw).ok()) << "cannot write " << kSwitch << " (the tests run as root)";               \
  } while (0)

}  // namespace deferfs_test
