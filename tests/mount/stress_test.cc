// Several processes hammering the same few files at once, in every
// completion mode with two workers (so two requests on one inode really run
// together): four children run random operations on a set of three files —
// O_DIRECT writes and reads at depth 8 through io_uring (into holes, into
// fallocated ranges, over data, past EOF), O_DIRECT and buffered preads,
// buffered writes at 512-byte but not 4 KiB alignment (the daemon's
// read-modify-write and its cached block), truncates both ways, fallocate
// plain, KEEP_SIZE, punch and zero range, fsync and fdatasync, renames out
// and back and exchanges — so the dio drains, the deferred completions, the
// read-modify-write block cache, truncate and punch against in-flight writes
// and the extent map all meet each other.
//
// Every 512-byte sector a child writes describes itself (inode, offset,
// child, sequence number, checksum), and every write and every zeroing
// (truncate, punch, zero range) is logged with the reading of a clock the
// children share, taken before the call and after its result came back.
// Then:
//  - during the run, no read shows stale device bytes (the backing is
//    pre-filled) or a sector written for another file or offset, and no
//    O_DIRECT read shows a sector older than a write or zeroing of it that
//    started after that sector's write had finished and itself finished
//    before the read was issued, nor zeros where such a write came after
//    every zeroing; a sector torn between two writes racing the read is
//    allowed (O_DIRECT is not atomic);
//  - at the end, through O_DIRECT and through the page cache, and again
//    after fsync and a remount, every sector below EOF is zeros or a sector
//    a child wrote to exactly this file and offset; it is not older than a
//    write or zeroing of it that started after its own write had finished
//    (no lost write, no data back from the dead), and it is zeros only if
//    no write of it started after every zeroing had finished; each size is
//    one the operations could have left;
//  - no child hangs (a deadline), the live gauges return to idle, and
//    `deferfs fsck` finds nothing wrong.
//
// DEFERFS_STRESS_SEED replays a run (the seed is in every failure message);
// DEFERFS_STRESS_OPS sets the operations per child.
#include <dirent.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>  // renameat2
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/io_helpers.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

constexpr int kFiles = 3;
constexpr int kChildren = 4;
constexpr int kWorkers = 2;
constexpr uint64_t kSector = 512;
constexpr uint64_t kBlock = 4096;
constexpr uint64_t kMaxIo = 64 << 10;                  // largest single write or read
constexpr uint64_t kSpan = 2ull << 20;                 // where operations start
constexpr uint64_t kHot = 256ull << 10;                // where half of them start
constexpr uint64_t kMaxEnd = kSpan + (128ull << 10);   // no operation reaches past this
constexpr uint64_t kSectors = kMaxEnd / kSector;
constexpr unsigned kDepth = 8;
constexpr uint8_t kStale = 0x5A;  // the backing's pre-fill
constexpr uint64_t kMagic = 0x5354524553534653;  // "SFSSERTS"
constexpr uint64_t kNever = UINT64_MAX;          // an operation that never finished
constexpr uint64_t kDefaultSeed = 20261129;
constexpr uint64_t kDefaultOps = 5000;

std::string SetName(int i) { return "f" + std::to_string(i); }
std::string SpareName(uint32_t child) { return "spare" + std::to_string(child); }

std::string ErrnoText(int err) { return std::string(strerror(err)) + " (errno " + std::to_string(err) + ")"; }

std::string Range(uint64_t off, uint64_t end) {
  return "[" + std::to_string(off) + ", " + std::to_string(end) + ")";
}

// ------------------------------------------------------------ the sectors

uint64_t Mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9;
  x = (x ^ (x >> 27)) * 0x94d049bb133111eb;
  return x ^ (x >> 31);
}

// The head of every sector a child writes; the rest of the sector is
// derived from `sum`, so a sector is valid only whole.
struct SectorHeader {
  uint64_t magic;
  uint64_t ino;    // st_ino of the descriptor it was written through
  uint64_t off;    // its byte offset in that file
  uint64_t child;
  uint64_t seq;    // the write's start on the shared clock: unique
  uint64_t sum;
};
static_assert(sizeof(SectorHeader) == 48 && (kSector - sizeof(SectorHeader)) % 8 == 0);

uint64_t HeaderSum(const SectorHeader& h) {
  return Mix(h.magic ^ Mix(h.ino ^ Mix(h.off ^ Mix(h.child ^ Mix(h.seq)))));
}

uint64_t BodyWord(uint64_t sum, size_t at) { return Mix(sum + at); }

// Fills the `len` bytes written at `off` of file `ino`, sector by sector.
void FillWrite(uint8_t* p, uint64_t ino, uint64_t off, uint64_t len, uint64_t child, uint64_t seq) {
  for (uint64_t s = 0; s < len; s += kSector) {
    SectorHeader h{kMagic, ino, off + s, child, seq, 0};
    h.sum = HeaderSum(h);
    std::memcpy(p + s, &h, sizeof h);
    for (size_t i = sizeof h; i < kSector; i += 8) {
      const uint64_t w = BodyWord(h.sum, i);
      std::memcpy(p + s + i, &w, 8);
    }
  }
}

enum class Sector { kZeros, kOurs, kStale, kForeign, kGarbage };

// What the sector at `off` of file `ino` holds; *h is its header if it has
// a valid one.
Sector Classify(const uint8_t* p, uint64_t ino, uint64_t off, SectorHeader* h) {
  std::memcpy(h, p, sizeof *h);
  if (h->magic == kMagic && h->sum == HeaderSum(*h)) {
    if (h->ino != ino || h->off != off) return Sector::kForeign;
    for (size_t i = sizeof *h; i < kSector; i += 8) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w != BodyWord(h->sum, i)) return Sector::kGarbage;  // torn
    }
    return Sector::kOurs;
  }
  bool zeros = true, stale = true;
  for (size_t i = 0; i < kSector; i++) {
    zeros &= p[i] == 0;
    stale &= p[i] == kStale;
  }
  return zeros ? Sector::kZeros : stale ? Sector::kStale : Sector::kGarbage;
}

std::string Describe(Sector s, const SectorHeader& h, const uint8_t* p) {
  switch (s) {
    case Sector::kZeros: return "zeros";
    case Sector::kOurs: return "child " + std::to_string(h.child) + "'s write seq " + std::to_string(h.seq);
    case Sector::kStale: return "stale device bytes (all 0x5A)";
    case Sector::kForeign:
      return "a sector written for ino " + std::to_string(h.ino) + " offset " + std::to_string(h.off) + " (child " +
             std::to_string(h.child) + ", seq " + std::to_string(h.seq) + ")";
    case Sector::kGarbage: break;
  }
  std::string hex;
  for (int i = 0; i < 16; i++) {
    hex += ' ';
    hex += "0123456789abcdef"[p[i] >> 4];
    hex += "0123456789abcdef"[p[i] & 15];
  }
  return "bytes no write gave it (torn or corrupt; starts" + hex + ")";
}

// During the run a read may race writes to the same range and O_DIRECT
// promises no atomicity, so a torn sector is no failure; stale device bytes
// are, and so is a whole sector written for another file or offset.
std::string CheckRead(const uint8_t* p, size_t n, uint64_t ino, uint64_t off) {
  for (size_t i = 0; i + kSector <= n; i += kSector) {
    SectorHeader h;
    const Sector s = Classify(p + i, ino, off + i, &h);
    if (s == Sector::kStale || s == Sector::kForeign) {
      return "the sector at " + std::to_string(off + i) + " of ino " + std::to_string(ino) + " holds " +
             Describe(s, h, p + i);
    }
  }
  return "";
}

// ------------------------------------------------------------ the events

enum class Kind : uint32_t {
  kDirectWrite, kBufferedWrite, kTruncate, kFallocate, kKeepSize, kPunch, kZeroRange, kZeroKeepSize
};

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kDirectWrite: return "O_DIRECT io_uring write";
    case Kind::kBufferedWrite: return "buffered pwrite";
    case Kind::kTruncate: return "ftruncate";
    case Kind::kFallocate: return "fallocate";
    case Kind::kKeepSize: return "fallocate KEEP_SIZE";
    case Kind::kPunch: return "punch";
    case Kind::kZeroRange: return "zero range";
    case Kind::kZeroKeepSize: return "zero range KEEP_SIZE";
  }
  return "?";
}
bool Writes(Kind k) { return k == Kind::kDirectWrite || k == Kind::kBufferedWrite; }
bool Zeroes(Kind k) {
  return k == Kind::kTruncate || k == Kind::kPunch || k == Kind::kZeroRange || k == Kind::kZeroKeepSize;
}
// Sets the size to at least `end`.
bool Grows(Kind k) { return Writes(k) || k == Kind::kFallocate || k == Kind::kZeroRange; }

// One write or change of a file's blocks or size, as a child logs it.
struct Event {
  uint64_t ino;
  uint64_t off, end;     // the bytes written or zeroed; a truncate: [new size, kMaxEnd)
  uint64_t start, done;  // the clock before the call and after its result (kNever: none came)
  uint32_t child, op;    // who, and its operation number
  Kind kind;
  uint32_t unused = 0;
};
static_assert(std::is_trivially_copyable_v<Event>);

std::string Describe(const Event& e) {
  return "child " + std::to_string(e.child) + " op #" + std::to_string(e.op) + " " + KindName(e.kind) + " of ino " +
         std::to_string(e.ino) + " " +
         (e.kind == Kind::kTruncate ? "to " + std::to_string(e.off) : Range(e.off, e.end)) + " (clock " +
         std::to_string(e.start) + ".." + (e.done == kNever ? "never" : std::to_string(e.done)) + ")";
}

std::string WriteEvents(const std::string& path, const std::vector<Event>& events) {
  UniqueFd fd(open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644));
  if (!fd.ok()) return "create " + path + ": " + ErrnoText(errno);
  if (int e = PwriteFull(fd.get(), events.data(), events.size() * sizeof(Event), 0); e != 0) {
    return "write " + path + ": " + ErrnoText(e);
  }
  return "";
}

::testing::AssertionResult ReadEvents(const std::string& path, std::vector<Event>* out) {
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  struct stat st{};
  if (!fd.ok() || fstat(fd.get(), &st) != 0) return ::testing::AssertionFailure() << path << ": " << strerror(errno);
  const size_t n = static_cast<size_t>(st.st_size) / sizeof(Event);
  std::vector<Event> events(n);
  if (PreadUpTo(fd.get(), events.data(), n * sizeof(Event), 0) != static_cast<ssize_t>(n * sizeof(Event))) {
    return ::testing::AssertionFailure() << "short read of " << path;
  }
  out->insert(out->end(), events.begin(), events.end());
  return ::testing::AssertionSuccess();
}

// ------------------------------------------------------- what they share

// Memory the children share (one anonymous shared mapping): a clock, read
// before an operation starts and after its result came back, that orders
// operations across processes (a.done < b.start: a finished before b
// began); who started at each tick, and when each write finished; and per
// file and sector, what is known to have finished on it. An O_DIRECT read
// is checked against what had finished before it was issued.
class Shared {
 public:
  Shared(std::vector<uint64_t> inos, uint64_t max_ticks) : inos_(std::move(inos)), max_ticks_(max_ticks) {
    words_ = 1 + 2 * max_ticks_ + 4 * kFiles * kSectors;
    void* p = mmap(nullptr, words_ * sizeof(Word), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) return;
    base_ = static_cast<Word*>(p);
    for (size_t i = 0; i < words_; i++) std::construct_at(base_ + i, 0);
    Word* next = base_ + 1;
    done_ = next, next += max_ticks_;
    who_ = next, next += max_ticks_;
    for (Word** table : {&write_start_, &zero_start_, &zero_done_, &zeroing_}) *table = next, next += kFiles * kSectors;
  }
  ~Shared() {
    if (base_) munmap(base_, words_ * sizeof(Word));
  }
  Shared(const Shared&) = delete;
  Shared& operator=(const Shared&) = delete;
  bool ok() const { return base_ != nullptr; }

  uint64_t Tick() { return base_->fetch_add(1) + 1; }
  // The file of the set `ino` is, or -1.
  int FileOf(uint64_t ino) const {
    auto it = std::find(inos_.begin(), inos_.end(), ino);
    return it == inos_.end() ? -1 : static_cast<int>(it - inos_.begin());
  }

  // `e` has its start; its call is about to be made.
  void Started(const Event& e) {
    if (e.start < max_ticks_) {
      who_[e.start].store(uint64_t{e.child} << 48 | uint64_t{static_cast<uint32_t>(e.kind)} << 32 | e.op);
    }
    if (Zeroes(e.kind)) ForSectors(e, [&](size_t i) { zeroing_[i].fetch_add(1); });
  }
  // `e` has its done: its call returned.
  void Finished(const Event& e) {
    if (Writes(e.kind) && e.start < max_ticks_) done_[e.start].store(e.done);
    ForSectors(e, [&](size_t i) {
      if (Writes(e.kind)) Raise(&write_start_[i], e.start);
      if (Zeroes(e.kind)) {
        Raise(&zero_start_[i], e.start);
        Raise(&zero_done_[i], e.done);
        zeroing_[i].fetch_sub(1);  // after zero_done_: a reader sees one or the other
      }
    });
  }

  // Per sector of [off, off + len) of `file`: the latest start of a write,
  // and of a zeroing, that had finished by now. Taken before a read.
  struct Finish {
    std::vector<uint64_t> write, zero;
  };
  Finish Before(int file, uint64_t off, uint64_t len) const {
    Finish f;
    for (uint64_t s = off / kSector; s < std::min(off + len, kMaxEnd) / kSector; s++) {
      f.write.push_back(write_start_[file * kSectors + s].load());
      f.zero.push_back(zero_start_[file * kSectors + s].load());
    }
    return f;
  }

  // What an O_DIRECT read of `file` (`ino`) at `off` returned, against what
  // had finished before it was issued: it must not show a sector older than
  // a write of it that started after that sector's write had finished (a
  // lost write), nor one a zeroing removed after its write had finished
  // (zeroed data back), nor zeros when a finished write has no zeroing
  // that could have come after it. "" or the first problem.
  std::string CheckOrder(const uint8_t* p, size_t n, int file, uint64_t ino, uint64_t off, const Finish& before) const {
    for (size_t k = 0; (k + 1) * kSector <= n && k < before.write.size(); k++) {
      const uint64_t at = off + k * kSector;
      const size_t i = file * kSectors + at / kSector;
      SectorHeader h;
      const Sector kind = Classify(p + k * kSector, ino, at, &h);
      const std::string holds = "the sector at " + std::to_string(at) + " of ino " + std::to_string(ino) + " holds ";
      if (kind == Sector::kOurs) {
        const uint64_t done = h.seq < max_ticks_ ? done_[h.seq].load() : 0;
        if (done == 0) continue;  // its write is not known to have finished
        if (before.write[k] > done) {
          return holds + Who(h.seq) + " (finished at " + std::to_string(done) + "), but " + Who(before.write[k]) +
                 " started after that and had finished before this read was issued (a lost write)";
        }
        if (before.zero[k] > done) {
          return holds + Who(h.seq) + " (finished at " + std::to_string(done) + "), but " + Who(before.zero[k]) +
                 " started after that and had finished before this read was issued (zeroed data came back)";
        }
      } else if (kind == Sector::kZeros && before.write[k] > 0) {
        // Any zeroing still running, or finished after the write started,
        // may have come after it.
        if (zeroing_[i].load() == 0 && zero_done_[i].load() < before.write[k]) {
          return holds + "zeros, but " + Who(before.write[k]) +
                 " had finished before this read was issued, after every zeroing of it (a lost write)";
        }
      }
    }
    return "";
  }

 private:
  using Word = std::atomic<uint64_t>;
  static_assert(Word::is_always_lock_free && sizeof(Word) == sizeof(uint64_t));

  static void Raise(Word* w, uint64_t v) {
    uint64_t cur = w->load();
    while (cur < v && !w->compare_exchange_weak(cur, v)) {
    }
  }
  template <typename Fn>
  void ForSectors(const Event& e, Fn fn) {
    const int file = FileOf(e.ino);
    if (file < 0) return;
    for (uint64_t s = e.off / kSector; s < std::min(e.end, kMaxEnd) / kSector; s++) fn(file * kSectors + s);
  }
  // "child C op #N <kind> (start T)" for the event that started at `tick`.
  std::string Who(uint64_t tick) const {
    const uint64_t w = tick < max_ticks_ ? who_[tick].load() : 0;
    return "child " + std::to_string(w >> 48) + " op #" + std::to_string(w & 0xffffffff) + " " +
           KindName(static_cast<Kind>((w >> 32) & 0xffff)) + " (start " + std::to_string(tick) + ")";
  }

  const std::vector<uint64_t> inos_;
  const uint64_t max_ticks_;
  size_t words_ = 0;
  Word* base_ = nullptr;  // the clock
  Word *done_ = nullptr, *who_ = nullptr;
  Word *write_start_ = nullptr, *zero_start_ = nullptr, *zero_done_ = nullptr, *zeroing_ = nullptr;
};

// ------------------------------------------------------------- a child

// Random operations on random files of the set, through descriptors it
// reopens by name now and then. Runs in a forked child: no gtest here.
class Worker {
 public:
  Worker(std::string root, uint32_t child, uint64_t seed, uint64_t ops, Shared* shared)
      : root_(std::move(root)), child_(child), seed_(seed), ops_(ops), shared_(shared), rng_(seed) {}
  ~Worker() {
    if (ring_ok_) io_uring_queue_exit(&ring_);
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // "" or what went wrong, with the operations before it.
  std::string Run() {
    if (int e = io_uring_queue_init(kDepth, &ring_, 0); e < 0) return "io_uring_queue_init: " + ErrnoText(-e);
    ring_ok_ = true;
    for (unsigned i = 0; i < kDepth; i++) bufs_.emplace_back(kMaxIo);
    for (op_ = 0; op_ < ops_; op_++) {
      now_.clear();
      std::string err = op_ < kFiles ? Reopen(static_cast<int>(op_)) : Step();
      if (!err.empty()) return Failure(err);
      history_.push_back("#" + std::to_string(op_) + " " + now_);
      if (history_.size() > 24) history_.pop_front();
    }
    return "";
  }
  const std::vector<Event>& events() const { return events_; }

 private:
  // A file of the set: opened by name, with a second descriptor on the
  // same open inode for O_DIRECT.
  struct Handle {
    UniqueFd buffered, direct;
    uint64_t ino = 0;
    int file = 0;  // index in the set, by inode
  };

  uint64_t Rand(uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_); }
  size_t Pick(std::initializer_list<double> weights) {
    std::discrete_distribution<size_t> d(weights);
    return d(rng_);
  }
  Handle& AnyHandle() { return handles_[Rand(kFiles)]; }
  std::string Path(const std::string& name) const { return root_ + "/" + name; }
  std::string Ino(const Handle& h) const { return "ino " + std::to_string(h.ino); }

  std::string Failure(const std::string& err) const {
    std::string out = "child " + std::to_string(child_) + " (seed " + std::to_string(seed_) + "), operation #" +
                      std::to_string(op_) + " (" + now_ + "): " + err + "\n  its operations before, oldest first:";
    for (const std::string& h : history_) out += "\n    " + h;
    return out;
  }

  size_t Log(Kind kind, uint64_t ino, uint64_t off, uint64_t end) {
    events_.push_back(Event{ino, off, end, shared_->Tick(), kNever, child_, static_cast<uint32_t>(op_), kind});
    shared_->Started(events_.back());
    return events_.size() - 1;
  }
  void Done(size_t event) {
    events_[event].done = shared_->Tick();
    shared_->Finished(events_[event]);
  }

  uint64_t Size(const Handle& h) const {
    struct stat st{};
    return fstat(h.buffered.get(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  }

  std::string Step() {
    switch (Pick({26, 6, 18, 4, 6, 12, 4, 3, 4})) {
      case 0: return UringBatch();
      case 1: return DirectRead();
      case 2: return BufferedWrite();
      case 3: return BufferedRead();
      case 4: return Truncate();
      case 5: return Fallocate();
      case 6: return Sync();
      case 7: return Rename();
      default: return Reopen(static_cast<int>(Rand(kFiles)));
    }
  }

  // Opens a random name of the set into slot `slot`.
  std::string Reopen(int slot) {
    const std::string name = SetName(static_cast<int>(Rand(kFiles)));
    now_ = "reopen slot " + std::to_string(slot) + " from " + name;
    UniqueFd b;
    for (int tries = 0;; tries++) {
      b.reset(open(Path(name).c_str(), O_RDWR | O_CLOEXEC));
      if (b.ok()) break;
      // ENOENT: another child has the name out in its rename window (renamed
      // to its spare name, not yet back); it comes back at once (10 s at most).
      const int e = errno;
      if (e != ENOENT || tries >= 20000) return "open " + name + ": " + ErrnoText(e);
      usleep(500);
    }
    // The same open inode again, not the name again (an exchange may move it).
    UniqueFd d(open(("/proc/self/fd/" + std::to_string(b.get())).c_str(), O_RDWR | O_DIRECT | O_CLOEXEC));
    if (!d.ok()) return "reopen O_DIRECT through /proc/self/fd: " + ErrnoText(errno);
    struct stat bs{}, ds{};
    if (fstat(b.get(), &bs) != 0 || fstat(d.get(), &ds) != 0) return "fstat: " + ErrnoText(errno);
    if (bs.st_ino != ds.st_ino) {
      return "the O_DIRECT reopen has ino " + std::to_string(ds.st_ino) + ", not " + std::to_string(bs.st_ino);
    }
    const int file = shared_->FileOf(bs.st_ino);
    if (file < 0) return "ino " + std::to_string(bs.st_ino) + " is not one of the set's";
    handles_[slot] = Handle{std::move(b), std::move(d), bs.st_ino, file};
    now_ += " (" + Ino(handles_[slot]) + ")";
    return "";
  }

  // An `align`-aligned offset for `len` bytes: half the time in the hot
  // region at the start of the file, where the children collide block by
  // block, else anywhere in the span.
  uint64_t Place(uint64_t align, uint64_t len) {
    const uint64_t region = Rand(2) ? kHot : kSpan;
    return align * Rand((std::max(region, len) - len) / align + 1);
  }

  // A 4 KiB-aligned place for an O_DIRECT write of `len`: holes, fallocated
  // ranges, data, or from EOF's block on to extend.
  uint64_t WriteOffset(const Handle& h, uint64_t len) {
    if (Rand(6) == 0) return std::min(Size(h) / kBlock * kBlock + kBlock * Rand(4), kMaxEnd - len);
    return Place(kBlock, len);
  }

  // Up to kDepth O_DIRECT writes and reads in flight at once, on any files.
  std::string UringBatch() {
    struct Flight {
      Handle* h;
      bool write;
      uint64_t off, len;
      size_t event;
      Shared::Finish before;  // a read's
    };
    const unsigned n = 1 + static_cast<unsigned>(Rand(kDepth));
    std::vector<Flight> flights;
    now_ = "io_uring batch:";
    for (unsigned i = 0; i < n; i++) {
      Handle& h = AnyHandle();
      const uint64_t len = kBlock * (1 + Rand(kMaxIo / kBlock));
      Flight f{&h, Rand(4) != 0, 0, len, 0, {}};
      f.off = f.write ? WriteOffset(h, len) : Place(kBlock, len);
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);  // never null: n <= kDepth, all reaped below
      if (f.write) {
        f.event = Log(Kind::kDirectWrite, h.ino, f.off, f.off + len);
        FillWrite(bufs_[i].data(), h.ino, f.off, len, child_, events_[f.event].start);
        io_uring_prep_write(sqe, h.direct.get(), bufs_[i].data(), static_cast<unsigned>(len), f.off);
      } else {
        f.before = shared_->Before(h.file, f.off, len);
        io_uring_prep_read(sqe, h.direct.get(), bufs_[i].data(), static_cast<unsigned>(len), f.off);
      }
      io_uring_sqe_set_data64(sqe, i);
      now_ += std::string(f.write ? " write " : " read ") + Ino(h) + " " + Range(f.off, f.off + len) +
              (f.write ? " seq " + std::to_string(events_[f.event].start) : "") + ";";
      flights.push_back(f);
    }
    const int submitted = io_uring_submit(&ring_);
    if (submitted != static_cast<int>(n)) {
      return "io_uring_submit: " +
             (submitted < 0 ? ErrnoText(-submitted) : std::to_string(submitted) + " of " + std::to_string(n));
    }
    std::string err;
    for (unsigned k = 0; k < n; k++) {
      io_uring_cqe* cqe = nullptr;
      int r;
      while ((r = io_uring_wait_cqe(&ring_, &cqe)) == -EINTR) {
      }
      if (r < 0) return "io_uring_wait_cqe: " + ErrnoText(-r);
      const unsigned i = static_cast<unsigned>(io_uring_cqe_get_data64(cqe));
      const int res = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      const Flight& f = flights[i];
      if (f.write) Done(f.event);
      if (!err.empty()) continue;  // reap the rest before returning
      const std::string what =
          std::string(f.write ? "write " : "read ") + Ino(*f.h) + " " + Range(f.off, f.off + f.len);
      if (res < 0) {
        err = what + ": " + ErrnoText(-res);
      } else if (f.write && static_cast<uint64_t>(res) != f.len) {
        err = what + ": short write of " + std::to_string(res) + " bytes";
      } else if (!f.write) {
        if (std::string bad = CheckDirectRead(bufs_[i].data(), static_cast<size_t>(res), *f.h, f.off, f.before);
            !bad.empty()) {
          err = what + ": " + bad;
        }
      }
    }
    return err;
  }

  std::string DirectRead() {
    Handle& h = AnyHandle();
    const uint64_t len = kBlock * (1 + Rand(kMaxIo / kBlock)), off = Place(kBlock, len);
    now_ = "O_DIRECT pread " + Ino(h) + " " + Range(off, off + len);
    const Shared::Finish before = shared_->Before(h.file, off, len);
    const ssize_t n = PreadUpTo(h.direct.get(), bufs_[0].data(), len, static_cast<off_t>(off));
    if (n < 0) return ErrnoText(static_cast<int>(-n));
    return CheckDirectRead(bufs_[0].data(), static_cast<size_t>(n), h, off, before);
  }

  std::string CheckDirectRead(const uint8_t* p, size_t n, const Handle& h, uint64_t off, const Shared::Finish& before) {
    std::string bad = CheckRead(p, n, h.ino, off);
    return bad.empty() ? shared_->CheckOrder(p, n, h.file, h.ino, off, before) : bad;
  }

  // Through the page cache: FUSE keeps it coherent with O_DIRECT writes of
  // other descriptors only loosely, so it may show an older sector; never a
  // stale or a foreign one.
  std::string BufferedRead() {
    Handle& h = AnyHandle();
    const uint64_t len = kSector * (1 + Rand(32)), off = Place(kSector, len);
    now_ = "buffered pread " + Ino(h) + " " + Range(off, off + len);
    std::vector<uint8_t> buf(len);
    const ssize_t n = PreadUpTo(h.buffered.get(), buf.data(), len, static_cast<off_t>(off));
    if (n < 0) return ErrnoText(static_cast<int>(-n));
    return CheckRead(buf.data(), static_cast<size_t>(n), h.ino, off);
  }

  // 512-byte aligned, never a whole aligned block: the daemon reads, merges
  // and writes whole blocks, or takes the block the last one left from its
  // cache — so a third of the time a few pieces in a row, each where the
  // one before ended (a file written in pieces), and sometimes at EOF.
  std::string BufferedWrite() {
    Handle& h = AnyHandle();
    const uint64_t pieces = Rand(3) == 0 ? 2 + Rand(4) : 1;
    const bool append = Rand(4) == 0;
    uint64_t off = append ? (Size(h) + kSector - 1) / kSector * kSector : Place(kSector, kSector);
    now_ = std::string("buffered pwrite") + (append ? " (append)" : "") + " " + Ino(h);
    for (uint64_t i = 0; i < pieces; i++) {
      const uint64_t len = kSector * (1 + Rand(24));
      if (off % kBlock == 0 && len % kBlock == 0) off += kSector * (1 + Rand(kBlock / kSector - 1));
      if (off + len > kMaxEnd) off = kMaxEnd - len - kSector;  // still not block aligned
      const size_t ev = Log(Kind::kBufferedWrite, h.ino, off, off + len);
      now_ += " " + Range(off, off + len) + " seq " + std::to_string(events_[ev].start) + ";";
      std::vector<uint8_t> data(len);
      FillWrite(data.data(), h.ino, off, len, child_, events_[ev].start);
      const int e = PwriteFull(h.buffered.get(), data.data(), len, static_cast<off_t>(off));
      Done(ev);
      if (e) return ErrnoText(e);
      off += len;
    }
    return "";
  }

  std::string Truncate() {
    Handle& h = AnyHandle();
    const uint64_t size = kSector * Rand((Rand(3) ? kSpan : kHot) / kSector + 1);
    const bool direct = Rand(2);
    now_ = std::string("ftruncate (") + (direct ? "O_DIRECT fd" : "buffered fd") + ") " + Ino(h) + " from about " +
           std::to_string(Size(h)) + " to " + std::to_string(size);
    const size_t ev = Log(Kind::kTruncate, h.ino, size, kMaxEnd);
    const int rc = ftruncate(direct ? h.direct.get() : h.buffered.get(), static_cast<off_t>(size));
    const int e = errno;
    Done(ev);
    return rc == 0 ? "" : ErrnoText(e);
  }

  std::string Fallocate() {
    struct Mode {
      Kind kind;
      int flags;
    };
    static constexpr Mode kModes[] = {{Kind::kFallocate, 0},
                                      {Kind::kKeepSize, FALLOC_FL_KEEP_SIZE},
                                      {Kind::kPunch, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE},
                                      {Kind::kZeroRange, FALLOC_FL_ZERO_RANGE},
                                      {Kind::kZeroKeepSize, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE}};
    const Mode& m = kModes[Rand(std::size(kModes))];
    Handle& h = AnyHandle();
    const uint64_t len = kSector * (1 + Rand(256)), off = Place(kSector, len);
    now_ = std::string(KindName(m.kind)) + " " + Ino(h) + " " + Range(off, off + len);
    const size_t ev = Log(m.kind, h.ino, off, off + len);
    const int rc = fallocate(Rand(2) ? h.direct.get() : h.buffered.get(), m.flags, static_cast<off_t>(off),
                             static_cast<off_t>(len));
    const int e = errno;
    Done(ev);
    return rc == 0 ? "" : ErrnoText(e);
  }

  std::string Sync() {
    Handle& h = AnyHandle();
    const bool data = Rand(2);
    now_ = std::string(data ? "fdatasync " : "fsync ") + Ino(h);
    const int fd = Rand(2) ? h.direct.get() : h.buffered.get();
    return (data ? fdatasync(fd) : fsync(fd)) == 0 ? "" : ErrnoText(errno);
  }

  // Either out to this child's own spare name and back — no one else uses
  // that name, and no one can take the set name meanwhile (nothing creates
  // files), so the set is whole again after — or an exchange of two set
  // names, atomic. ENOENT: another child has one of the names out now.
  std::string Rename() {
    const int i = static_cast<int>(Rand(kFiles));
    if (Rand(2)) {
      const std::string from = Path(SetName(i)), spare = Path(SpareName(child_));
      now_ = "rename " + SetName(i) + " -> " + SpareName(child_) + " and back";
      if (rename(from.c_str(), spare.c_str()) != 0) return errno == ENOENT ? "" : "out: " + ErrnoText(errno);
      struct stat st{};
      const int rc = stat(spare.c_str(), &st);
      const int e = errno;
      if (rename(spare.c_str(), from.c_str()) != 0) return "back: " + ErrnoText(errno);
      return rc == 0 ? "" : "stat of the spare name: " + ErrnoText(e);
    }
    const int j = static_cast<int>((i + 1 + Rand(kFiles - 1)) % kFiles);
    now_ = "exchange " + SetName(i) + " <-> " + SetName(j);
    if (renameat2(AT_FDCWD, Path(SetName(i)).c_str(), AT_FDCWD, Path(SetName(j)).c_str(), RENAME_EXCHANGE) != 0 &&
        errno != ENOENT) {
      return ErrnoText(errno);
    }
    return "";
  }

  const std::string root_;
  const uint32_t child_;
  const uint64_t seed_, ops_;
  Shared* shared_;
  std::mt19937_64 rng_;
  io_uring ring_{};
  bool ring_ok_ = false;
  std::vector<AlignedBuf> bufs_;  // one per in-flight slot
  std::array<Handle, kFiles> handles_;
  std::vector<Event> events_;
  uint64_t op_ = 0;
  std::string now_;                   // the current operation, for messages
  std::deque<std::string> history_;   // the last ones
};

// ------------------------------------------------------------ the checker

// What the children's logs say may be in each file at the end.
class History {
 public:
  explicit History(std::vector<Event> events) : events_(std::move(events)) {
    for (size_t i = 0; i < events_.size(); i++) {
      const Event& e = events_[i];
      Coverage& c = files_[e.ino];
      if (c.last_write.empty()) {
        c.last_write = c.last_zero_start = c.last_zero_done = std::vector<int64_t>(kSectors, -1);
      }
      if (Writes(e.kind)) by_seq_[e.start] = i;
      for (uint64_t s = e.off / kSector; s < std::min(e.end, kMaxEnd) / kSector; s++) {
        if (Writes(e.kind)) Latest(&c.last_write[s], i, &Event::start);
        if (Zeroes(e.kind)) {
          Latest(&c.last_zero_start[s], i, &Event::start);
          Latest(&c.last_zero_done[s], i, &Event::done);
        }
      }
    }
  }

  size_t size() const { return events_.size(); }

  // Problems with `bytes`, the whole quiescent file `ino`.
  void CheckFile(const std::string& name, uint64_t ino, const std::vector<uint8_t>& bytes,
                 std::vector<std::string>* errors) const {
    const std::string file = name + " (ino " + std::to_string(ino) + ")";
    CheckSize(file, ino, bytes.size(), errors);
    static const Coverage kUntouched{std::vector<int64_t>(kSectors, -1), std::vector<int64_t>(kSectors, -1),
                                     std::vector<int64_t>(kSectors, -1)};
    auto it = files_.find(ino);
    const Coverage& c = it == files_.end() ? kUntouched : it->second;
    for (uint64_t s = 0; s < std::min<uint64_t>(bytes.size() / kSector, kSectors); s++) {
      const uint64_t off = s * kSector;
      const uint8_t* p = bytes.data() + off;
      SectorHeader h;
      const Sector kind = Classify(p, ino, off, &h);
      const std::string at = file + " sector at " + std::to_string(off) + " holds " + Describe(kind, h, p);
      const Event* w = c.last_write[s] >= 0 ? &events_[c.last_write[s]] : nullptr;
      if (kind == Sector::kZeros) {
        // Zeros are right only if a zeroing (or the file's creation) may
        // have come after every write of the sector.
        const uint64_t zeroed = c.last_zero_done[s] >= 0 ? events_[c.last_zero_done[s]].done : 0;
        if (w && w->start > zeroed) {
          errors->push_back(at + ", but " + Describe(*w) + " started after every zeroing of it had finished (" +
                            (zeroed ? "the last: " + Describe(events_[c.last_zero_done[s]]) : "it was never zeroed") +
                            ")");
        }
        continue;
      }
      if (kind != Sector::kOurs) {
        errors->push_back(at);
        continue;
      }
      auto seq = by_seq_.find(h.seq);
      const Event* mine = seq == by_seq_.end() ? nullptr : &events_[seq->second];
      if (!mine || mine->ino != ino || mine->child != h.child || off < mine->off || off >= mine->end) {
        errors->push_back(at + ", which no logged write put there" +
                          (mine ? " (seq " + std::to_string(h.seq) + " is " + Describe(*mine) + ")" : ""));
        continue;
      }
      if (w && w->start > mine->done) {
        errors->push_back(at + " from " + Describe(*mine) + ", but " + Describe(*w) +
                          " started after it had finished (a lost write)");
      }
      if (const int64_t z = c.last_zero_start[s]; z >= 0 && events_[z].start > mine->done) {
        errors->push_back(at + " from " + Describe(*mine) + ", but " + Describe(events_[z]) +
                          " started after it had finished (zeroed data came back)");
      }
    }
  }

 private:
  // Per 512-byte sector of a file: the index of the write that started
  // last, of the zeroing that started last and of the one that finished
  // last (-1: none).
  struct Coverage {
    std::vector<int64_t> last_write, last_zero_start, last_zero_done;
  };

  void Latest(int64_t* slot, size_t i, uint64_t Event::*when) const {
    if (*slot < 0 || events_[*slot].*when < events_[i].*when) *slot = static_cast<int64_t>(i);
  }

  // The size is one the operations could leave: it was set by one of them
  // (or is the empty file's), no extension is lost that no truncate below it
  // could have followed, and no truncate below it came after everything
  // that could make it this large had finished.
  void CheckSize(const std::string& file, uint64_t ino, uint64_t size, std::vector<std::string>* errors) const {
    const std::string is = file + " has size " + std::to_string(size);
    if (size % kSector != 0 || size > kMaxEnd) errors->push_back(is + ", which no operation could leave");
    // The latest end of a truncate to at most `size` (one may have undone
    // any extension past it), and of anything that makes the file at least
    // `size` (one may have undone any truncate below it); 0: none.
    uint64_t shrunk = 0, reached = 0;
    bool produced = size == 0;
    for (const Event& e : events_) {
      if (e.ino != ino) continue;
      const bool truncate = e.kind == Kind::kTruncate;
      produced |= (truncate && e.off == size) || (Grows(e.kind) && e.end == size);
      if (truncate && e.off <= size) shrunk = std::max(shrunk, e.done);
      if ((truncate && e.off >= size) || (Grows(e.kind) && e.end >= size)) reached = std::max(reached, e.done);
    }
    for (const Event& e : events_) {
      if (e.ino != ino) continue;
      if (Grows(e.kind) && e.end > size && shrunk < e.start) {
        errors->push_back(is + ", but " + Describe(e) + " made it at least " + std::to_string(e.end) +
                          " after every truncate to at most that had finished");
      }
      if (e.kind == Kind::kTruncate && e.off < size && reached < e.start) {
        errors->push_back(is + ", but " + Describe(e) +
                          " started after everything that could make it that large had finished");
      }
    }
    if (!produced) errors->push_back(is + ", which no logged operation set");
  }

  std::vector<Event> events_;
  std::unordered_map<uint64_t, size_t> by_seq_;  // a write's start is its sectors' seq
  std::map<uint64_t, Coverage> files_;           // by ino
};

// One file of the set, read whole.
struct Image {
  uint64_t ino = 0;
  std::vector<uint8_t> bytes;
};

// `path` whole, through O_DIRECT or the page cache, with the inode number of
// the descriptor that read it; "" or what went wrong.
std::string ReadImage(const std::string& path, bool direct, Image* out) {
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0)));
  struct stat st{};
  if (!fd.ok() || fstat(fd.get(), &st) != 0) return "open/fstat " + path + ": " + ErrnoText(errno);
  const size_t size = static_cast<size_t>(st.st_size);
  AlignedBuf buf((size + kBlock - 1) / kBlock * kBlock + kBlock);  // room to see bytes past st_size
  const ssize_t n = PreadUpTo(fd.get(), buf.data(), buf.size(), 0);
  if (n < 0) return "read " + path + ": " + ErrnoText(static_cast<int>(-n));
  if (static_cast<size_t>(n) != size) {
    return path + ": read " + std::to_string(n) + " bytes, st_size " + std::to_string(size);
  }
  out->ino = st.st_ino;
  out->bytes.assign(buf.data(), buf.data() + size);
  return "";
}

struct CloseDir {
  void operator()(DIR* d) const { closedir(d); }
};

// The set as it is now, quiescent: the directory holds exactly its names,
// each one of the set's inodes; each file reads the same through O_DIRECT
// and the page cache, and passes the history's checks. The O_DIRECT images
// by name.
std::map<std::string, Image> CheckFinalState(const MountedFs& fs, const History& history,
                                             const std::set<uint64_t>& inos, const std::string& when) {
  SCOPED_TRACE(when);
  std::set<std::string> names;
  if (std::unique_ptr<DIR, CloseDir> dir(opendir(fs.root().c_str())); dir) {
    while (dirent* e = readdir(dir.get())) {
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) names.insert(e->d_name);
    }
  } else {
    ADD_FAILURE() << "opendir " << fs.root() << ": " << strerror(errno);
  }
  std::set<std::string> want;
  for (int i = 0; i < kFiles; i++) want.insert(SetName(i));
  EXPECT_EQ(names, want) << "the directory does not hold exactly the set";

  std::map<std::string, Image> images;
  std::set<uint64_t> seen;
  std::vector<std::string> errors;
  for (const std::string& name : want) {
    Image direct, cached;
    if (std::string e = ReadImage(fs.path(name), true, &direct); !e.empty()) {
      ADD_FAILURE() << "O_DIRECT: " << e;
      continue;
    }
    if (std::string e = ReadImage(fs.path(name), false, &cached); !e.empty()) {
      ADD_FAILURE() << "page cache: " << e;
      continue;
    }
    EXPECT_TRUE(inos.count(direct.ino)) << name << " is ino " << direct.ino << ", not one of the set's";
    EXPECT_TRUE(seen.insert(direct.ino).second) << name << ": ino " << direct.ino << " has two names";
    EXPECT_EQ(cached.ino, direct.ino);
    EXPECT_TRUE(SameBytes(direct.bytes, cached.bytes)) << name << ": O_DIRECT and the page cache disagree";
    history.CheckFile(name, direct.ino, direct.bytes, &errors);
    images[name] = std::move(direct);
  }
  for (size_t i = 0; i < errors.size() && i < 20; i++) ADD_FAILURE() << errors[i];
  EXPECT_TRUE(errors.empty()) << errors.size() << " problems in the files; " << history.size() << " events logged";
  return images;
}

// ------------------------------------------------------------------ tests

class StressTest : public ::testing::TestWithParam<MountVariant> {
 protected:
  void SetUp() override {
    if (const char* d = getenv("DEFERFS_TEST_DIR"); d != nullptr && *d != '\0') {
      GTEST_SKIP() << "the stress test reads deferfs' own gauges";
    }
  }
};

TEST_P(StressTest, ProcessesSharingFilesKeepEverySectorConsistent) {
  const uint64_t seed = EnvOr("DEFERFS_STRESS_SEED", kDefaultSeed);
  const uint64_t ops = EnvOr("DEFERFS_STRESS_OPS", kDefaultOps);
  SCOPED_TRACE("DEFERFS_STRESS_SEED=" + std::to_string(seed) + " DEFERFS_STRESS_OPS=" + std::to_string(ops) + " (" +
               GetParam().Describe() + ")");

  TempDir tmp;
  const std::string backing = tmp / "backing.img";
  ASSERT_TRUE(MakePrefilledBacking(backing, 256ull << 20, kStale));
  std::optional<MountedFs> fs;  // unmounted before tmp goes
  fs.emplace(GetParam().ConfigFor(backing));
  ASSERT_TRUE(fs->ok());
  ASSERT_TRUE(BecomesIdle(*fs, kWorkers));

  std::set<uint64_t> inos;
  for (int i = 0; i < kFiles; i++) {
    UniqueFd fd(open(fs->path(SetName(i)).c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644));
    struct stat st{};
    ASSERT_TRUE(fd.ok() && fstat(fd.get(), &st) == 0) << SetName(i) << ": " << strerror(errno);
    inos.insert(st.st_ino);
  }

  // Two ticks an event at most, kDepth events an operation at most.
  Shared shared(std::vector<uint64_t>(inos.begin(), inos.end()), (ops + 1) * kChildren * 2 * kDepth + 16);
  ASSERT_TRUE(shared.ok()) << strerror(errno);

  // The children, each under a deadline only a hang gets near (a default run
  // takes seconds); a hang kills it (and the daemon if even that does not
  // end it), and the unmount at the end cleans up. All are forked from this
  // thread, the process's only one (see Child).
  const std::chrono::seconds deadline(std::max<uint64_t>(120, ops * 12 / 1000));
  auto log_of = [&](uint32_t c) { return tmp / ("events" + std::to_string(c)); };
  std::vector<Child> children;
  for (uint32_t c = 0; c < kChildren; c++) {
    children.emplace_back([&, c] {
      Worker w(fs->root(), c, seed + c, ops, &shared);
      std::string err = w.Run();
      std::string log_err = WriteEvents(log_of(c), w.events());
      return err.empty() ? log_err : err;
    });
  }
  std::vector<ChildOutcome> outcomes;
  for (Child& child : children) outcomes.push_back(child.Wait(deadline, fs->daemon_pid()));
  bool hung = false, failed = false;
  for (uint32_t c = 0; c < kChildren; c++) {
    hung |= outcomes[c].timed_out;
    failed |= !outcomes[c].exited_ok;
    if (!outcomes[c].exited_ok) ADD_FAILURE() << "child " << c << ": " << outcomes[c].message;
  }
  ASSERT_FALSE(hung) << "a child hung; daemon log:\n" << fs->DaemonLog();
  if (failed) ADD_FAILURE() << "daemon log:\n" << fs->DaemonLog();

  std::vector<Event> events;
  for (uint32_t c = 0; c < kChildren; c++) ASSERT_TRUE(ReadEvents(log_of(c), &events));
  const History history(std::move(events));

  // Every request answered, every buffer back, every file released.
  EXPECT_TRUE(BecomesIdle(*fs, kWorkers));
  Stats s = Stats::Read(*fs);
  EXPECT_EQ(s["dio.errors"], 0u) << s.raw();
  EXPECT_GT(s["dio.writes"], 0u) << s.raw();

  const std::map<std::string, Image> before = CheckFinalState(*fs, history, inos, "after the run");
  for (const auto& [name, image] : before) {
    UniqueFd fd(open(fs->path(name).c_str(), O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.ok()) << name << ": " << strerror(errno);
    ASSERT_EQ(fsync(fd.get()), 0) << name << ": " << strerror(errno);
  }
  ASSERT_TRUE(fs->Remount()) << fs->DaemonLog();
  const std::map<std::string, Image> after = CheckFinalState(*fs, history, inos, "after fsync and a remount");
  for (const auto& [name, image] : before) {
    auto it = after.find(name);
    if (it == after.end()) continue;  // reported already
    EXPECT_EQ(it->second.ino, image.ino) << name;
    EXPECT_TRUE(SameBytes(image.bytes, it->second.bytes)) << name << " changed across fsync and a remount";
  }

  ASSERT_TRUE(fs->Unmount());
  RunResult fsck = RunDeferfs({"fsck", backing});
  EXPECT_TRUE(fsck.succeeded()) << "deferfs fsck: " << fsck.Describe();
}

INSTANTIATE_TEST_SUITE_P(Modes, StressTest, ::testing::ValuesIn(EveryMode(kWorkers, 1, 1)), VariantName());

}  // namespace
}  // namespace deferfs_test
