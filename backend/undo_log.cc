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
// kWrite carries the range's prior contents (len bytes). kCompleted names
// its write in `covers`. kFlush covers the writes completed before record
// `covers`. kFileCreated and kFileSynced carry the file's path (len bytes);
// kFileSynced's off is the synced length.
enum : uint8_t { kWrite = 1, kCompleted = 2, kFlush = 3, kFileCreated = 4, kFileSynced = 5 };
// Blocks are tracked in units of the smallest DIO alignment: every logged
// range is a multiple of it.
constexpr uint64_t kUnit = 512;

// Host byte order: a log is read back on the machine that wrote it.
struct Header {
  uint32_t magic;
  uint8_t type;
  uint8_t fua;  // kCompleted: the write was FUA
  uint8_t pad[2];
  uint32_t len;  // bytes of the range or path that follow (kWrite, file records)
  uint32_t pad2;
  uint64_t off;
  uint64_t seq;  // order of the record
  uint64_t covers;
};

bool HasPayload(uint8_t type) { return type == kWrite || type == kFileCreated || type == kFileSynced; }

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
  if (!fd.valid()) {
    return Status::Error(errno, "cannot create the undo log " + path + ": " + std::strerror(errno) +
                                    ": give undo_log= a file in a writable directory");
  }
  *out = std::make_unique<UndoLog>(Key(), std::move(fd), dev_fd, dio_align);
  return Status::Ok();
}

UndoLog::UndoLog(Key, UniqueFd log_fd, int dev_fd, uint32_t dio_align)
    : log_fd_(std::move(log_fd)), dev_fd_(dev_fd), dio_align_(dio_align) {}

// Called with mu_ held. One writev per record, so a kill tears at most the
// last one.
uint64_t UndoLog::Append(uint8_t type, uint64_t off, uint32_t len, uint64_t covers, const void* data, bool fua) {
  Header h{};
  h.magic = kMagic;
  h.type = type;
  h.fua = fua;
  h.len = data ? len : 0;
  h.off = off;
  h.seq = next_seq_++;
  h.covers = covers;
  struct iovec iov[2] = {{&h, sizeof h}, {const_cast<void*>(data), h.len}};
  ssize_t n;
  do {
    n = writev(log_fd_.get(), iov, data ? 2 : 1);
  } while (n < 0 && errno == EINTR);
  return n == static_cast<ssize_t>(sizeof h + h.len) ? h.seq : 0;
}

Status UndoLog::BeforeWrite(uint64_t off, uint32_t len, uint64_t* seq) {
  AlignedBuffer prior(len, dio_align_);
  if (prior.data() == nullptr) return Status::Error(ENOMEM, "undo log: no memory for " + std::to_string(len) + " bytes");
  std::lock_guard<std::mutex> l(mu_);
  // Read under mu_: the record's place in the log must follow any earlier
  // write of these blocks whose record it might otherwise overtake.
  if (!PreadFull(dev_fd_, prior.data(), len, off)) {
    return Status::IoError("undo log: reading the " + std::to_string(len) + " bytes at " + std::to_string(off) +
                           " before their write failed: " + (errno ? std::strerror(errno) : "end of device"));
  }
  *seq = Append(kWrite, off, len, 0, prior.data());
  if (*seq == 0) return Status::IoError("undo log: writing it failed: free space where undo_log= points");
  return Status::Ok();
}

// A lost kCompleted or kFlush record makes the roll-back stricter than the
// device; a lost kFileCreated or kFileSynced one makes it keep more of a file.
void UndoLog::Completed(uint64_t seq, bool fua) {
  std::lock_guard<std::mutex> l(mu_);
  Append(kCompleted, 0, 0, seq, nullptr, fua);
}

uint64_t UndoLog::FlushStarts() {
  std::lock_guard<std::mutex> l(mu_);
  return next_seq_;
}

void UndoLog::Flushed(uint64_t mark) {
  std::lock_guard<std::mutex> l(mu_);
  Append(kFlush, 0, 0, mark, nullptr);
}

void UndoLog::FileCreated(const std::string& path) {
  std::lock_guard<std::mutex> l(mu_);
  Append(kFileCreated, 0, static_cast<uint32_t>(path.size()), 0, path.data());
}

void UndoLog::FileSynced(const std::string& path, uint64_t size) {
  std::lock_guard<std::mutex> l(mu_);
  Append(kFileSynced, size, static_cast<uint32_t>(path.size()), 0, path.data());
}

Status RollBackUnflushedWrites(const std::string& log_path, const std::string& device_path, UnsyncedFiles files,
                               RolledBack* out) {
  *out = RolledBack{};
  UniqueFd log(open(log_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!log.valid()) return Status::Error(errno, "cannot open the undo log " + log_path + ": " + std::strerror(errno));
  UniqueFd dev(open(device_path.c_str(), O_RDWR | O_CLOEXEC));
  if (!dev.valid()) return Status::Error(errno, "cannot open " + device_path + ": " + std::strerror(errno));
  struct stat st;
  if (fstat(log.get(), &st) != 0) return Status::Error(errno, "cannot stat " + log_path + ": " + std::strerror(errno));
  const uint64_t log_size = static_cast<uint64_t>(st.st_size);

  struct Completion {
    uint64_t seq;  // of the kCompleted record
    bool fua;
  };
  struct Change {
    uint64_t seq;  // of the write
    uint64_t pos;  // of the unit's prior contents in the log
  };
  std::unordered_map<uint64_t, Completion> completed;  // write's seq -> its completion; absent: never completed
  std::unordered_map<uint64_t, std::vector<Change>> units;  // each in log order
  std::unordered_map<std::string, uint64_t> synced;         // file created -> its durable length
  uint64_t flushed = 0;  // writes completed before record `flushed` are durable
  for (uint64_t pos = 0;;) {
    Header h;
    if (!PreadFull(log.get(), &h, sizeof h, pos)) break;  // the end, or a torn header
    const bool ranged = h.type == kWrite;
    if (h.magic != kMagic || h.type < kWrite || h.type > kFileSynced || (ranged && (h.len % kUnit || h.off % kUnit))) {
      return Status::Invalid(log_path + " is not an undo log, or is damaged at byte " + std::to_string(pos));
    }
    const uint64_t data = pos + sizeof h;
    const uint64_t len = HasPayload(h.type) ? h.len : 0;
    if (data + len > log_size) break;  // torn: what it announced never happened
    pos = data + len;
    switch (h.type) {
      case kWrite:
        for (uint64_t i = 0; i < h.len / kUnit; i++) units[h.off / kUnit + i].push_back({h.seq, data + i * kUnit});
        break;
      case kCompleted:
        completed[h.covers] = {h.seq, h.fua != 0};
        break;
      case kFlush:
        flushed = std::max(flushed, h.covers);
        break;
      default: {
        std::string path(h.len, '\0');
        if (!PreadFull(log.get(), path.data(), h.len, data)) return Status::IoError("reading " + log_path + " failed");
        if (h.type == kFileCreated) {
          synced[path] = 0;
        } else if (auto it = synced.find(path); it != synced.end()) {
          it->second = h.off;
        }
      }
    }
  }

  // A unit holds what its last durable write left: restore the prior
  // contents of the first write after that one (of the first write, if
  // none was durable).
  std::vector<uint8_t> buf(kUnit);
  for (const auto& [unit, changes] : units) {
    size_t first_lost = 0;
    for (size_t i = changes.size(); i-- > 0;) {
      const auto c = completed.find(changes[i].seq);
      if (c != completed.end() && (c->second.fua || c->second.seq < flushed)) {
        first_lost = i + 1;
        break;
      }
    }
    if (first_lost == changes.size()) continue;
    if (!PreadFull(log.get(), buf.data(), kUnit, changes[first_lost].pos) ||
        !PwriteFull(dev.get(), buf.data(), kUnit, unit * kUnit)) {
      return Status::IoError("rolling back " + device_path + " from " + log_path + " failed: " + std::strerror(errno));
    }
    out->device_bytes += kUnit;
  }
  if (fsync(dev.get()) != 0) return Status::Error(errno, "fsync of " + device_path + " failed: " + std::strerror(errno));
  if (files == UnsyncedFiles::kWrittenBack) return Status::Ok();
  for (const auto& [path, length] : synced) {
    struct stat fst;
    if (stat(path.c_str(), &fst) != 0) continue;  // removed since
    if (static_cast<uint64_t>(fst.st_size) <= length) continue;
    if (truncate(path.c_str(), static_cast<off_t>(length)) != 0) {
      return Status::Error(errno, "cutting " + path + " back to its last sync failed: " + std::strerror(errno));
    }
    out->file_bytes += static_cast<uint64_t>(fst.st_size) - length;
  }
  return Status::Ok();
}

}  // namespace deferfs
