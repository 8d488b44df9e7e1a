#include "backend/undo_log.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "backend/device.h"

namespace deferfs {
namespace {

constexpr uint32_t kMagic = 0x4f444e55;  // "UNDO"
// kFileCreated and kFileSynced carry the file's path (len bytes); off is the
// synced length.
enum : uint8_t { kWrite = 1, kDurable = 2, kFlush = 3, kFileCreated = 4, kFileSynced = 5 };
// Blocks are tracked in units of the smallest DIO alignment: every logged
// range is a multiple of it.
constexpr uint64_t kUnit = 512;

// Host byte order: a log is read back on the machine that wrote it.
struct Header {
  uint32_t magic;
  uint8_t type;
  uint8_t pad[3];
  uint32_t len;     // bytes of the range or path; kWrite and the file records carry them
  uint32_t pad2;
  uint64_t off;     // device offset of the range
  uint64_t seq;     // order of the record
  uint64_t covers;  // kFlush: the writes with seq < covers are durable
};

std::string Errno(int err) { return std::strerror(err); }

// Whole-buffer IO on a regular file; false with errno on error, or with
// errno 0 at a short read (the end of the log).
bool PreadFull(int fd, void* buf, size_t len, uint64_t off) {
  auto* p = static_cast<uint8_t*>(buf);
  while (len > 0) {
    ssize_t n = pread(fd, p, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = 0;
      return false;
    }
    p += n;
    off += static_cast<uint64_t>(n);
    len -= static_cast<size_t>(n);
  }
  return true;
}

bool PwriteFull(int fd, const void* buf, size_t len, uint64_t off) {
  const auto* p = static_cast<const uint8_t*>(buf);
  while (len > 0) {
    ssize_t n = pwrite(fd, p, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    off += static_cast<uint64_t>(n);
    len -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

Status UndoLog::Create(const std::string& path, int dev_fd, uint32_t dio_align, std::unique_ptr<UndoLog>* out) {
  UniqueFd fd(open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_APPEND | O_CLOEXEC, 0600));
  if (!fd.valid()) return Status::Error(errno, "cannot create the undo log " + path + ": " + Errno(errno));
  *out = std::make_unique<UndoLog>(Key(), std::move(fd), dev_fd, dio_align);
  return Status::Ok();
}

UndoLog::UndoLog(Key, UniqueFd log_fd, int dev_fd, uint32_t dio_align)
    : log_fd_(std::move(log_fd)), dev_fd_(dev_fd), dio_align_(dio_align) {}

// Called with mu_ held. One writev per record, so a kill tears at most the
// last one.
Status UndoLog::Append(uint8_t type, uint64_t off, uint32_t len, uint64_t covers, const void* data) {
  Header h{};
  h.magic = kMagic;
  h.type = type;
  h.len = len;
  h.off = off;
  h.seq = next_seq_++;
  h.covers = covers;
  struct iovec iov[2] = {{&h, sizeof h}, {const_cast<void*>(data), data ? len : 0u}};
  const size_t want = sizeof h + (data ? len : 0u);
  ssize_t n;
  do {
    n = writev(log_fd_.get(), iov, data ? 2 : 1);
  } while (n < 0 && errno == EINTR);
  if (n != static_cast<ssize_t>(want)) {
    return Status::IoError("undo log write failed: " + (n < 0 ? Errno(errno) : std::string("short write")));
  }
  return Status::Ok();
}

Status UndoLog::BeforeWrite(uint64_t off, uint32_t len) {
  AlignedBuffer prior(len, dio_align_);
  if (prior.data() == nullptr) return Status::Error(ENOMEM, "undo log: no memory for " + std::to_string(len) + " bytes");
  std::lock_guard<std::mutex> l(mu_);
  // Read under mu_: the record's place in the log must follow any earlier
  // write of these blocks whose record it might otherwise overtake.
  if (!PreadFull(dev_fd_, prior.data(), len, off)) {
    return Status::IoError("undo log: reading the " + std::to_string(len) + " bytes at " + std::to_string(off) +
                           " before their write failed: " + (errno ? Errno(errno) : std::string("end of device")));
  }
  return Append(kWrite, off, len, 0, prior.data());
}

void UndoLog::Durable(uint64_t off, uint32_t len) {
  std::lock_guard<std::mutex> l(mu_);
  (void)Append(kDurable, off, len, 0, nullptr);  // lost: the roll-back is stricter than the device
}

uint64_t UndoLog::FlushStarts() {
  std::lock_guard<std::mutex> l(mu_);
  return next_seq_;
}

void UndoLog::Flushed(uint64_t mark) {
  std::lock_guard<std::mutex> l(mu_);
  (void)Append(kFlush, 0, 0, mark, nullptr);
}

// Lost records make the roll-back stricter than the device, as above.
void UndoLog::FileCreated(const std::string& path) {
  std::lock_guard<std::mutex> l(mu_);
  (void)Append(kFileCreated, 0, static_cast<uint32_t>(path.size()), 0, path.data());
}

void UndoLog::FileSynced(const std::string& path, uint64_t size) {
  std::lock_guard<std::mutex> l(mu_);
  (void)Append(kFileSynced, size, static_cast<uint32_t>(path.size()), 0, path.data());
}

Status RollBackUnflushedWrites(const std::string& log_path, const std::string& device_path, UnsyncedFiles files,
                               uint64_t* bytes_undone) {
  *bytes_undone = 0;
  UniqueFd log(open(log_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!log.valid()) return Status::Error(errno, "cannot open the undo log " + log_path + ": " + Errno(errno));
  UniqueFd dev(open(device_path.c_str(), O_RDWR | O_CLOEXEC));
  if (!dev.valid()) return Status::Error(errno, "cannot open " + device_path + ": " + Errno(errno));

  // Per unit: the first write logged since its last durable point, whose
  // prior contents are what a power cut leaves there.
  struct Unit {
    uint64_t durable = 0;  // seq of the last completed FUA write over it
    uint64_t first = 0;    // seq of that first write; 0: none
    uint64_t pos = 0;      // where its prior contents are in the log
  };
  std::unordered_map<uint64_t, Unit> units;
  struct stat st;
  if (fstat(log.get(), &st) != 0) return Status::Error(errno, "cannot stat " + log_path + ": " + Errno(errno));
  const uint64_t log_size = static_cast<uint64_t>(st.st_size);
  uint64_t flushed = 0;  // writes with seq < flushed are durable
  std::unordered_map<std::string, uint64_t> synced;  // file created -> its durable length
  uint64_t pos = 0;
  for (;;) {
    Header h;
    if (!PreadFull(log.get(), &h, sizeof h, pos)) break;  // the end, or a torn header
    const bool file = h.type == kFileCreated || h.type == kFileSynced;
    if (h.magic != kMagic || (!file && (h.len % kUnit || h.off % kUnit))) {
      return Status::Invalid(log_path + " is not an undo log, or is damaged at byte " + std::to_string(pos));
    }
    const uint64_t data = pos + sizeof h;
    if (data + (h.type == kWrite || file ? h.len : 0) > log_size) break;  // torn: it never happened
    if (file) {
      std::string path(h.len, '\0');
      if (!PreadFull(log.get(), path.data(), h.len, data)) break;
      if (h.type == kFileCreated) {
        synced[path] = 0;
      } else if (auto it = synced.find(path); it != synced.end()) {
        it->second = h.off;
      }
      pos = data + h.len;
    } else if (h.type == kWrite) {
      for (uint64_t i = 0; i < h.len / kUnit; i++) {
        Unit& u = units[h.off / kUnit + i];
        if (u.first == 0 || u.first < std::max(flushed, u.durable)) {
          u.first = h.seq;
          u.pos = data + i * kUnit;
        }
      }
      pos = data + h.len;
    } else if (h.type == kDurable) {
      for (uint64_t i = 0; i < h.len / kUnit; i++) units[h.off / kUnit + i].durable = h.seq;
      pos = data;
    } else if (h.type == kFlush) {
      flushed = std::max(flushed, h.covers);
      pos = data;
    } else {
      return Status::Invalid(log_path + " has a record of unknown type " + std::to_string(h.type) + " at byte " +
                             std::to_string(pos));
    }
  }

  std::vector<uint8_t> buf(kUnit);
  for (const auto& [unit, u] : units) {
    if (u.first == 0 || u.first < std::max(flushed, u.durable)) continue;
    if (!PreadFull(log.get(), buf.data(), kUnit, u.pos) || !PwriteFull(dev.get(), buf.data(), kUnit, unit * kUnit)) {
      return Status::IoError("rolling back " + device_path + " from " + log_path + " failed: " + Errno(errno));
    }
    *bytes_undone += kUnit;
  }
  if (fsync(dev.get()) != 0) return Status::Error(errno, "fsync of " + device_path + " failed: " + Errno(errno));
  if (files == UnsyncedFiles::kWrittenBack) return Status::Ok();
  for (const auto& [path, length] : synced) {
    struct stat fst;
    if (stat(path.c_str(), &fst) != 0) continue;  // removed since
    if (static_cast<uint64_t>(fst.st_size) <= length) continue;
    if (truncate(path.c_str(), static_cast<off_t>(length)) != 0) {
      return Status::Error(errno, "cutting " + path + " back to its last sync failed: " + Errno(errno));
    }
    *bytes_undone += static_cast<uint64_t>(fst.st_size) - length;
  }
  return Status::Ok();
}

}  // namespace deferfs
