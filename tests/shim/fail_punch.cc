// LD_PRELOAD shim for the mount tests: fallocate(2) with FALLOC_FL_PUNCH_HOLE
// fails with EOPNOTSUPP, as on a file system that cannot punch holes; every
// other fallocate goes to libc's.
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>

namespace {

using Fallocate = int (*)(int, int, off_t, off_t);

int Forward(const char* name, int fd, int mode, off_t off, off_t len) {
  if (mode & FALLOC_FL_PUNCH_HOLE) {
    errno = EOPNOTSUPP;
    return -1;
  }
  auto real = reinterpret_cast<Fallocate>(dlsym(RTLD_NEXT, name));
  if (real == nullptr) {
    errno = ENOSYS;
    return -1;
  }
  return real(fd, mode, off, len);
}

}  // namespace

extern "C" int fallocate(int fd, int mode, off_t off, off_t len) { return Forward("fallocate", fd, mode, off, len); }
extern "C" int fallocate64(int fd, int mode, off_t off, off_t len) {
  return Forward("fallocate64", fd, mode, off, len);
}
