#include "backend/metadata.h"

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <unordered_map>
#include <utility>

#include "backend/clock.h"
#include "backend/rocksdb_logger.h"

namespace deferfs {
namespace {

// Key space: one prefix byte, then big-endian integers so that RocksDB's
// bytewise order is numeric order (readdir by cookie, extents by lblk).
enum Prefix : char {
  kPairing = 'S',   // "S"                 -> magic, uuid, version
  kNextIno = 'N',   // "N"                 -> u64
  kInode = 'I',     // I ino               -> InodeRecord
  kDentry = 'D',    // D dir name          -> ino, mode, cookie
  kCookie = 'R',    // R dir cookie        -> name
  kSymlink = 'L',   // L ino               -> target
  kXattr = 'X',     // X ino name          -> value
  kExtent = 'E',    // E ino lblk          -> len, pblk, state
  kOrphan = 'O',    // O ino               -> ""
};
constexpr char kPairingMagic[] = "deferfs-meta";

// The length a key of each prefix has: exactly, or (names) more than 9.
// A key of any other shape is never written by this format; every scan
// skips it, and fsck reports and deletes it (ForEachMalformedKey).
constexpr size_t kNamedKey = 0;
size_t KeyLength(char prefix) {
  switch (prefix) {
    case kPairing: case kNextIno: return 1;
    case kInode: case kSymlink: case kOrphan: return 9;
    case kCookie: case kExtent: return 17;
    case kDentry: case kXattr: return kNamedKey;
    default: return SIZE_MAX;
  }
}
// A key as fsck prints it: hex, at most 24 bytes of it.
std::string Hex(const rocksdb::Slice& k) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < k.size() && i < 24; i++) {
    out.push_back(kDigits[static_cast<uint8_t>(k[i]) >> 4]);
    out.push_back(kDigits[static_cast<uint8_t>(k[i]) & 15]);
  }
  return k.size() > 24 ? out + "..." : out;
}
bool WellFormed(const rocksdb::Slice& k) {
  if (k.empty()) return false;
  const size_t want = KeyLength(k[0]);
  return want == kNamedKey ? k.size() > 9 : k.size() == want;
}

void AppendBe64(std::string* s, uint64_t v) {
  for (int i = 7; i >= 0; i--) s->push_back(static_cast<char>(v >> (i * 8)));
}
uint64_t ReadBe64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

std::string Key(char prefix) { return std::string(1, prefix); }
std::string Key(char prefix, uint64_t a) {
  std::string k(1, prefix);
  AppendBe64(&k, a);
  return k;
}
std::string Key(char prefix, uint64_t a, uint64_t b) {
  std::string k = Key(prefix, a);
  AppendBe64(&k, b);
  return k;
}
std::string Key(char prefix, uint64_t a, std::string_view name) {
  std::string k = Key(prefix, a);
  k.append(name);
  return k;
}

// Little-endian fixed-width values (native on every host deferfs builds for).
template <typename T>
void Put(std::string* s, T v) {
  s->append(reinterpret_cast<const char*>(&v), sizeof(v));
}
template <typename T>
T Get(const char*& p) {
  T v;
  std::memcpy(&v, p, sizeof(v));
  p += sizeof(v);
  return v;
}

std::string EncodeInode(const InodeRecord& r) {
  std::string s;
  Put(&s, r.mode); Put(&s, r.uid); Put(&s, r.gid); Put(&s, r.nlink);
  Put(&s, r.size); Put(&s, r.rdev);
  Put(&s, r.atime_ns); Put(&s, r.mtime_ns); Put(&s, r.ctime_ns); Put(&s, r.crtime_ns);
  Put(&s, r.parent); Put(&s, r.next_cookie);
  return s;
}
constexpr size_t kInodeValueSize = 4 * 4 + 8 * 8;
constexpr size_t kDirEntryValueSize = 8 + 4 + 8;  // ino, mode, cookie

// Why an inode value cannot be decoded, as an fsck line; empty if it can.
std::string InodeValueFault(uint64_t ino, size_t bytes) {
  if (bytes == kInodeValueSize) return {};
  return "ino " + std::to_string(ino) + ": the inode record is corrupt (" + std::to_string(bytes) + " bytes, not " +
         std::to_string(kInodeValueSize) + ")";
}

// `p` holds kInodeValueSize bytes (checked by the caller).
void DecodeInodeValue(uint64_t ino, const char* p, InodeRecord* r) {
  r->ino = ino;
  r->mode = Get<uint32_t>(p); r->uid = Get<uint32_t>(p); r->gid = Get<uint32_t>(p); r->nlink = Get<uint32_t>(p);
  r->size = Get<uint64_t>(p); r->rdev = Get<uint64_t>(p);
  r->atime_ns = Get<int64_t>(p); r->mtime_ns = Get<int64_t>(p); r->ctime_ns = Get<int64_t>(p); r->crtime_ns = Get<int64_t>(p);
  r->parent = Get<uint64_t>(p); r->next_cookie = Get<uint64_t>(p);
}

Status DecodeInode(uint64_t ino, const std::string& s, InodeRecord* r) {
  if (std::string fault = InodeValueFault(ino, s.size()); !fault.empty()) {
    return Status::IoError("metadata: " + fault + ": run 'deferfs fsck'");
  }
  DecodeInodeValue(ino, s.data(), r);
  return Status::Ok();
}

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::Ok();
  if (s.IsNotFound()) return Status::NotFound(what + ": not found");
  if (s.IsNoSpace()) return Status::NoSpace("metadata store is out of space (" + s.ToString() + "): free space on its filesystem");
  return Status::IoError("metadata store error in " + what + ": " + s.ToString());
}

rocksdb::Options DbOptions(rocksdb::Env* env = nullptr) {
  rocksdb::Options o;
  if (env) o.env = env;
  // The WAL is written out only by SyncWal() (or a full buffer), each time
  // behind the data barrier; see DataBarrier.
  o.manual_wal_flush = true;
  o.create_if_missing = false;
  o.paranoid_checks = true;
  o.max_background_jobs = 2;
  o.write_buffer_size = 32 << 20;
  // Room for the WAL of several commit= intervals at full speed: a full
  // buffer would be written out (behind a device flush, ~5 ms here) by
  // whichever commit filled it, a FUSE worker in the middle of a request.
  // (It caps every file writer's buffer; each grows only as it must.)
  o.writable_file_max_buffer_size = 32 << 20;
  o.keep_log_file_num = 4;
  o.info_log_level = rocksdb::WARN_LEVEL;
  return o;
}

// Opens `dir` read-write through the ordered file system (DataBarrier).
rocksdb::Status OpenOrdered(const std::string& dir, bool create, std::unique_ptr<MetaStore>* out,
                            UndoLog* undo_log = nullptr) {
  auto barrier = std::make_shared<DataBarrier>();
  std::unique_ptr<rocksdb::Env> env = rocksdb::NewCompositeEnv(NewOrderedFileSystem(barrier, undo_log));
  rocksdb::Options o = DbOptions(env.get());
  o.info_log = NewRocksLogger();  // not a LOG file on the store's own filesystem
  o.create_if_missing = create;
  o.error_if_exists = create;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(o, dir, &raw);
  if (s.ok()) {
    *out = std::make_unique<MetaStore>(MetaStore::Private{}, std::move(barrier), std::move(env),
                                       std::unique_ptr<rocksdb::DB>(raw));
  }
  return s;
}

// A record a scan cannot decode: passed to `on_corrupt` (true: scan on) if
// given, else the error that stops the scan.
bool Corrupt(const CorruptFn& on_corrupt, CorruptRecord r, Status* stop) {
  if (on_corrupt) {
    on_corrupt(std::move(r));
    return true;
  }
  *stop = Status::IoError("metadata: " + r.what + ": run 'deferfs fsck'");
  return false;
}

// Iterates keys that start with `prefix`, from `start` on.
template <typename Fn>
Status Scan(rocksdb::DB* db, const std::string& prefix, const std::string& start, Fn&& fn,
            const rocksdb::ReadOptions& ro = rocksdb::ReadOptions()) {
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(ro));
  for (it->Seek(start); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    if (!fn(it->key(), it->value())) break;
  }
  return FromRocks(it->status(), "scan");
}

}  // namespace

MetaBatch::MetaBatch() : wb_(std::make_unique<rocksdb::WriteBatch>()) {}
MetaBatch::~MetaBatch() = default;
bool MetaBatch::empty() const { return wb_->Count() == 0; }
size_t MetaBatch::size() const { return wb_->Count(); }

void MetaBatch::PutInode(const InodeRecord& r) { wb_->Put(Key(kInode, r.ino), EncodeInode(r)); }

void MetaBatch::PutDirEntry(uint64_t dir, const DirEntry& e) {
  std::string v;
  Put(&v, e.ino); Put(&v, e.mode); Put(&v, e.cookie);
  wb_->Put(Key(kDentry, dir, e.name), v);
  wb_->Put(Key(kCookie, dir, e.cookie), e.name);
}

void MetaBatch::DeleteDirEntry(uint64_t dir, const DirEntry& e) {
  wb_->Delete(Key(kDentry, dir, e.name));
  wb_->Delete(Key(kCookie, dir, e.cookie));
}

void MetaBatch::PutSymlink(uint64_t ino, std::string_view target) {
  wb_->Put(Key(kSymlink, ino), rocksdb::Slice(target.data(), target.size()));
}
void MetaBatch::PutXattr(uint64_t ino, std::string_view name, std::string_view value) {
  wb_->Put(Key(kXattr, ino, name), rocksdb::Slice(value.data(), value.size()));
}
void MetaBatch::DeleteXattr(uint64_t ino, std::string_view name) { wb_->Delete(Key(kXattr, ino, name)); }

void MetaBatch::PutExtent(uint64_t ino, const ExtentRecord& e) {
  std::string v;
  Put(&v, e.len); Put(&v, e.pblk); Put(&v, e.state);
  wb_->Put(Key(kExtent, ino, e.lblk), v);
}
void MetaBatch::DeleteExtent(uint64_t ino, uint64_t lblk) { wb_->Delete(Key(kExtent, ino, lblk)); }
void MetaBatch::PutOrphan(uint64_t ino) { wb_->Put(Key(kOrphan, ino), ""); }
void MetaBatch::DeleteOrphan(uint64_t ino) { wb_->Delete(Key(kOrphan, ino)); }
void MetaBatch::PutNextIno(uint64_t next) {
  std::string v;
  Put(&v, next);
  wb_->Put(Key(kNextIno), v);
}
void MetaBatch::DeleteCorrupt(const CorruptRecord& r) { wb_->Delete(r.key); }

MetaStore::MetaStore(Private, std::shared_ptr<DataBarrier> barrier, std::unique_ptr<rocksdb::Env> env,
                     std::unique_ptr<rocksdb::DB> db)
    : barrier_(std::move(barrier)), env_(std::move(env)), db_(std::move(db)) {}

MetaStore::~MetaStore() {
  if (writer_.joinable()) {
    {
      std::lock_guard l(deferred_mu_);
      writer_stop_ = true;
    }
    deferred_cv_.notify_one();
    writer_.join();
  }
  if (!db_) return;
  (void)SyncWal();
  db_->Close().PermitUncheckedError();
}

bool MetaStore::Exists(const std::string& dir) {
  std::error_code ec;
  return std::filesystem::exists(std::filesystem::path(dir) / "CURRENT", ec);
}

Status MetaStore::Create(const std::string& dir, const Uuid& uuid, uint32_t uid, uint32_t gid) {
  std::unique_ptr<MetaStore> store;
  rocksdb::Status s = OpenOrdered(dir, /*create=*/true, &store);
  if (!s.ok()) return Status::IoError("cannot create metadata directory " + dir + ": " + s.ToString());

  std::string pairing(kPairingMagic, sizeof(kPairingMagic));
  pairing.append(reinterpret_cast<const char*>(uuid.data()), uuid.size());
  Put(&pairing, kFormatVersion);

  const int64_t ns = NowNs();
  InodeRecord root;
  root.ino = kRootIno;
  root.mode = S_IFDIR | 0755;
  root.uid = uid;
  root.gid = gid;
  root.nlink = 2;
  root.atime_ns = root.mtime_ns = root.ctime_ns = root.crtime_ns = ns;
  root.parent = kRootIno;
  root.next_cookie = kFirstDirCookie;

  MetaBatch b;
  b.wb_->Put(Key(kPairing), pairing);
  b.PutInode(root);
  b.PutNextIno(kRootIno + 1);
  return store->Commit(&b, /*sync=*/true);
}

namespace {

// `dir` opened read-only (RocksDB writes nothing then), after the checks
// that it is a store at all.
Status OpenStoreReadOnly(const std::string& dir, const rocksdb::Options& o, std::unique_ptr<rocksdb::DB>* db) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    if (std::filesystem::exists(dir, ec)) {
      return Status::Invalid("metadata directory " + dir + " is not a directory: pass the right -o meta=DIR");
    }
    return Status::NotFound("metadata directory " + dir + " does not exist: pass -o meta=DIR or re-run 'deferfs mkfs'");
  }
  if (!MetaStore::Exists(dir)) {
    return Status::Invalid(dir + " is not a deferfs metadata directory: pass the right -o meta=DIR");
  }
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::OpenForReadOnly(o, dir, &raw);
  if (!s.ok()) return Status::Invalid(dir + " is not a readable deferfs metadata directory (" + s.ToString() + "): pass the right -o meta=DIR");
  db->reset(raw);
  return Status::Ok();
}

// The UUID of the filesystem whose store `db` is; false if it is no deferfs store.
bool ReadPairing(rocksdb::DB* db, Uuid* uuid) {
  std::string pairing;
  rocksdb::Status s = db->Get(rocksdb::ReadOptions(), Key(kPairing), &pairing);
  if (!s.ok() || pairing.size() != sizeof(kPairingMagic) + uuid->size() + 4 ||
      std::memcmp(pairing.data(), kPairingMagic, sizeof(kPairingMagic)) != 0) {
    return false;
  }
  std::memcpy(uuid->data(), pairing.data() + sizeof(kPairingMagic), uuid->size());
  return true;
}

// Whether the store `db` (in `dir`) is a deferfs store paired with `uuid`.
Status CheckPairing(rocksdb::DB* db, const std::string& dir, const Uuid& uuid) {
  Uuid have;
  if (!ReadPairing(db, &have)) {
    return Status::Invalid(dir + " is not a deferfs metadata directory: pass the right -o meta=DIR");
  }
  if (have != uuid) {
    return Status::Invalid("metadata directory " + dir + " belongs to another filesystem (uuid " + UuidToString(have) +
                           ", backing device has " + UuidToString(uuid) + "): pass the right -o meta=DIR");
  }
  return Status::Ok();
}

constexpr char kInUse[] = " is in use by another deferfs (a mount, fsck or mkfs)";
constexpr char kWhenIdle[] = ": unmount it, or let fsck or mkfs finish, then try again";

// Every mount, fsck and mkfs --force of a store holds a lock on RocksDB's
// LOCK file: RocksDB itself a write lock when open read-write, OpenReadOnly
// a read lock, LockIdle a write lock. This takes one of `type` (F_WRLCK or
// F_RDLCK) for as long as *held stays open; EBUSY if a conflicting one is
// held. Ok with nothing held when there is no LOCK: the store was never
// opened read-write. (fcntl locks are the process's: closing any other fd
// of LOCK in this process drops them, so nothing else here may open it
// meanwhile.)
Status LockStoreFile(const std::string& dir, short type, UniqueFd* held) {
  const std::string path = (std::filesystem::path(dir) / "LOCK").string();
  UniqueFd fd(::open(path.c_str(), (type == F_WRLCK ? O_RDWR : O_RDONLY) | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ENOENT) return Status::Ok();
    return Status::Error(errno, "cannot open " + path + ": " + strerror(errno));
  }
  struct flock l = {};
  l.l_type = type;
  l.l_whence = SEEK_SET;
  if (fcntl(fd.get(), F_SETLK, &l) != 0) {
    if (errno == EAGAIN || errno == EACCES) return Status::Error(EBUSY, dir + kInUse);
    return Status::Error(errno, "cannot lock " + path + ": " + strerror(errno));
  }
  *held = std::move(fd);
  return Status::Ok();
}

}  // namespace

Status MetaStore::OpenReadWrite(const std::string& dir, const Uuid& uuid, std::unique_ptr<MetaStore>* out,
                                UndoLog* undo_log) {
  // Check the pairing read-only first: opening read-write replays and
  // rewrites the log, and a store that is not ours must stay untouched.
  DEFERFS_RETURN_IF_ERROR(CheckPaired(dir, uuid));
  std::unique_ptr<MetaStore> store;
  rocksdb::Status s = OpenOrdered(dir, /*create=*/false, &store, undo_log);
  if (s.IsIOError() && s.ToString().find("lock") != std::string::npos) {
    return Status::Error(EBUSY, "metadata directory " + dir + kInUse + kWhenIdle);
  }
  if (!s.ok()) return Status::IoError("cannot open metadata directory " + dir + ": " + s.ToString());
  // Again, now that it is locked: a mkfs --force may have put another
  // filesystem's store there in between. (That store has then been opened
  // read-write, its log replayed: this refuses to use it, no more.)
  DEFERFS_RETURN_IF_ERROR(CheckPairing(store->db_.get(), dir, uuid));
  *out = std::move(store);
  return Status::Ok();
}

namespace {
// Runs `fn` on the store in `dir` opened read-only, with no LOG file: a store
// that is not ours stays as it was.
template <typename Fn>
Status PeekStore(const std::string& dir, Fn&& fn) {
  rocksdb::Options o = DbOptions();
  o.info_log = NewRocksLogger();
  std::unique_ptr<rocksdb::DB> db;
  DEFERFS_RETURN_IF_ERROR(OpenStoreReadOnly(dir, o, &db));
  Status s = fn(db.get());
  db->Close().PermitUncheckedError();
  return s;
}
}  // namespace

Status MetaStore::CheckPaired(const std::string& dir, const Uuid& uuid) {
  return PeekStore(dir, [&](rocksdb::DB* db) { return CheckPairing(db, dir, uuid); });
}

bool MetaStore::IsStore(const std::string& dir) {
  return PeekStore(dir, [](rocksdb::DB* db) {
           Uuid any;
           return ReadPairing(db, &any) ? Status::Ok() : Status::Invalid("no pairing record");
         }).ok();
}

Status MetaStore::LockIdle(const std::string& dir, UniqueFd* held) { return LockStoreFile(dir, F_WRLCK, held); }

Status MetaStore::Open(const std::string& dir, const Uuid& uuid, std::unique_ptr<MetaStore>* out,
                       UndoLog* undo_log) {
  std::unique_ptr<MetaStore> store;
  DEFERFS_RETURN_IF_ERROR(OpenReadWrite(dir, uuid, &store, undo_log));
  DEFERFS_RETURN_IF_ERROR(store->LoadInodeCounter(dir));
  // The thread that writes deferred commits: a mounted store's only.
  store->writer_ = std::thread([raw = store.get()] { raw->DeferredWriterMain(); });
  *out = std::move(store);
  return Status::Ok();
}

Status MetaStore::OpenForFsck(const std::string& dir, const Uuid& uuid, std::unique_ptr<MetaStore>* out) {
  std::unique_ptr<MetaStore> store;
  DEFERFS_RETURN_IF_ERROR(OpenReadWrite(dir, uuid, &store));
  if (Status s = store->LoadInodeCounter(dir); !s.ok()) {
    if (s.err() != ENOENT) return s;  // a store that cannot be read is not repaired
    store->next_ino_ = 0;
  }
  *out = std::move(store);
  return Status::Ok();
}

Status MetaStore::OpenReadOnly(const std::string& dir, const Uuid& uuid, std::unique_ptr<MetaStore>* out) {
  // No new log, manifest or options file. The backing device's lock keeps
  // other mounts out; a read lock on RocksDB's LOCK keeps out a mkfs --force
  // that would replace the store (LockIdle) and read-write opens.
  UniqueFd lock;
  if (Status l = LockStoreFile(dir, F_RDLCK, &lock); !l.ok()) {
    if (l.err() != EBUSY) return l;
    return Status::Error(EBUSY, l.message() + kWhenIdle);
  }
  rocksdb::Options o = DbOptions();
  o.info_log = NewRocksLogger();
  std::unique_ptr<rocksdb::DB> db;
  DEFERFS_RETURN_IF_ERROR(OpenStoreReadOnly(dir, o, &db));
  DEFERFS_RETURN_IF_ERROR(CheckPairing(db.get(), dir, uuid));
  auto store = std::make_unique<MetaStore>(Private{}, std::make_shared<DataBarrier>(), nullptr, std::move(db));
  store->read_only_ = true;
  store->read_lock_ = std::move(lock);
  DEFERFS_RETURN_IF_ERROR(store->LoadInodeCounter(dir));
  *out = std::move(store);
  return Status::Ok();
}

Status MetaStore::LoadInodeCounter(const std::string& dir) {
  std::string next;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), Key(kNextIno), &next);
  if (s.IsNotFound() || (s.ok() && next.size() != 8)) {
    return Status::NotFound("metadata directory " + dir + " has no valid inode counter: run 'deferfs fsck'");
  }
  DEFERFS_RETURN_IF_ERROR(FromRocks(s, "reading the inode counter"));
  const char* p = next.data();
  next_ino_ = Get<uint64_t>(p);
  return Status::Ok();
}

Status MetaStore::GetInode(uint64_t ino, InodeRecord* rec) {
  DEFERFS_RETURN_IF_ERROR(ApplyDeferredFor(ino));
  std::string v;
  DEFERFS_RETURN_IF_ERROR(FromRocks(db_->Get(rocksdb::ReadOptions(), Key(kInode, ino), &v), "inode " + std::to_string(ino)));
  return DecodeInode(ino, v, rec);
}

Status MetaStore::Lookup(uint64_t dir, std::string_view name, DirEntry* e) {
  return LookupAt(rocksdb::ReadOptions(), dir, name, e);
}

Status MetaStore::LookupAt(const rocksdb::ReadOptions& ro, uint64_t dir, std::string_view name, DirEntry* e) {
  std::string v;
  rocksdb::Status s = db_->Get(ro, Key(kDentry, dir, name), &v);
  if (s.IsNotFound()) return Status::NotFound(std::string(name));
  DEFERFS_RETURN_IF_ERROR(FromRocks(s, "lookup"));
  if (v.size() != kDirEntryValueSize) {
    return Status::IoError("metadata: dir " + std::to_string(dir) + " entry '" + std::string(name) +
                           "': the record is corrupt: run 'deferfs fsck'");
  }
  const char* p = v.data();
  e->name.assign(name);
  e->ino = Get<uint64_t>(p);
  e->mode = Get<uint32_t>(p);
  e->cookie = Get<uint64_t>(p);
  return Status::Ok();
}

Status MetaStore::ReadDir(uint64_t dir, uint64_t after, const std::function<bool(const DirEntry&)>& fn) {
  // One snapshot for the cookie index and the entries it names: an entry
  // removed or re-created meanwhile can neither fail the scan nor come back
  // with a newer cookie out of order.
  struct Snap {
    rocksdb::DB* db;
    const rocksdb::Snapshot* s;
    ~Snap() { db->ReleaseSnapshot(s); }
  } snap{db_.get(), db_->GetSnapshot()};
  rocksdb::ReadOptions ro;
  ro.snapshot = snap.s;
  Status inner;
  Status st = Scan(
      db_.get(), Key(kCookie, dir), Key(kCookie, dir, after + 1),
      [&](const rocksdb::Slice& k, const rocksdb::Slice& v) {
        if (!WellFormed(k)) return true;
        DirEntry e;
        inner = LookupAt(ro, dir, std::string_view(v.data(), v.size()), &e);
        if (!inner.ok()) return false;
        return fn(e);
      },
      ro);
  return inner.ok() ? st : inner;
}

Status MetaStore::HasEntries(uint64_t dir, bool* any) {
  *any = false;
  return Scan(db_.get(), Key(kCookie, dir), Key(kCookie, dir), [&](const rocksdb::Slice& k, const rocksdb::Slice&) {
    if (!WellFormed(k)) return true;
    *any = true;
    return false;
  });
}

Status MetaStore::GetSymlink(uint64_t ino, std::string* target) {
  return FromRocks(db_->Get(rocksdb::ReadOptions(), Key(kSymlink, ino), target), "symlink");
}

Status MetaStore::GetXattr(uint64_t ino, std::string_view name, std::string* value) {
  xattr_reads_.fetch_add(1, std::memory_order_relaxed);
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), Key(kXattr, ino, name), value);
  if (s.IsNotFound()) return Status::Error(ENODATA, "no such attribute");
  return FromRocks(s, "getxattr");
}

Status MetaStore::ListXattrs(uint64_t ino, std::vector<std::string>* names) {
  xattr_reads_.fetch_add(1, std::memory_order_relaxed);
  std::string prefix = Key(kXattr, ino);
  return Scan(db_.get(), prefix, prefix, [&](const rocksdb::Slice& k, const rocksdb::Slice&) {
    if (!WellFormed(k)) return true;
    names->emplace_back(k.data() + prefix.size(), k.size() - prefix.size());
    return true;
  });
}

namespace {
// An extent record: key E ino lblk, value len pblk state (17 bytes).
constexpr size_t kExtentValueBytes = 17;

// Scans extent records under `prefix`, decoding each.
Status ScanExtents(rocksdb::DB* db, const std::string& prefix,
                   const std::function<void(uint64_t, const ExtentRecord&)>& fn, const CorruptFn& on_corrupt) {
  Status inner;
  Status st = Scan(db, prefix, prefix, [&](const rocksdb::Slice& k, const rocksdb::Slice& v) {
    if (!WellFormed(k)) {
      // fsck reports it with every malformed key; a mount must not read a
      // part of a file as zeros without a word.
      if (on_corrupt) return true;
      inner = Status::IoError("metadata: a malformed extent key: run 'deferfs fsck'");
      return false;
    }
    const uint64_t ino = ReadBe64(k.data() + 1);
    if (v.size() != kExtentValueBytes) {
      std::string what = "ino " + std::to_string(ino) + ": an extent record is corrupt (" + std::to_string(v.size()) +
                         " bytes, not " + std::to_string(kExtentValueBytes) + ")";
      return Corrupt(on_corrupt, {CorruptRecord::Kind::kExtent, ino, std::move(what), k.ToString()}, &inner);
    }
    ExtentRecord e;
    e.lblk = ReadBe64(k.data() + 9);
    const char* p = v.data();
    e.len = Get<uint64_t>(p);
    e.pblk = Get<uint64_t>(p);
    e.state = Get<uint8_t>(p);
    fn(ino, e);
    return true;
  });
  return inner.ok() ? st : inner;
}
}  // namespace

Status MetaStore::ForEachExtent(uint64_t ino, const std::function<void(const ExtentRecord&)>& fn) {
  DEFERFS_RETURN_IF_ERROR(ApplyDeferredFor(ino));
  return ScanExtents(db_.get(), Key(kExtent, ino), [&](uint64_t, const ExtentRecord& e) { fn(e); }, nullptr);
}

Status MetaStore::ForEachExtentAll(const std::function<void(uint64_t, const ExtentRecord&)>& fn,
                                   const CorruptFn& on_corrupt) {
  DEFERFS_RETURN_IF_ERROR(ApplyDeferred());
  return ScanExtents(db_.get(), Key(kExtent), fn, on_corrupt);
}

Status MetaStore::ForEachInode(const std::function<void(const InodeRecord&)>& fn, const CorruptFn& on_corrupt) {
  DEFERFS_RETURN_IF_ERROR(ApplyDeferred());
  std::string prefix = Key(kInode);
  Status inner;
  Status st = Scan(db_.get(), prefix, prefix, [&](const rocksdb::Slice& k, const rocksdb::Slice& v) {
    if (!WellFormed(k)) return true;
    const uint64_t ino = ReadBe64(k.data() + 1);
    if (std::string fault = InodeValueFault(ino, v.size()); !fault.empty()) {
      return Corrupt(on_corrupt, {CorruptRecord::Kind::kInode, ino, std::move(fault), k.ToString()}, &inner);
    }
    InodeRecord r;
    DecodeInodeValue(ino, v.data(), &r);
    fn(r);
    return true;
  });
  return inner.ok() ? st : inner;
}

Status MetaStore::CountInodes(uint64_t* n) {
  *n = 0;
  std::string prefix = Key(kInode);
  return Scan(db_.get(), prefix, prefix, [&](const rocksdb::Slice& k, const rocksdb::Slice&) {
    *n += WellFormed(k);
    return true;
  });
}

Status MetaStore::ListOrphans(std::vector<uint64_t>* inos) {
  std::string prefix = Key(kOrphan);
  return Scan(db_.get(), prefix, prefix, [&](const rocksdb::Slice& k, const rocksdb::Slice&) {
    if (WellFormed(k)) inos->push_back(ReadBe64(k.data() + 1));
    return true;
  });
}

Status MetaStore::ForEachDirEntryAll(const std::function<void(uint64_t, const DirEntry&)>& fn,
                                     const CorruptFn& on_corrupt) {
  std::string prefix = Key(kDentry);
  Status inner;
  Status st = Scan(db_.get(), prefix, prefix, [&](const rocksdb::Slice& k, const rocksdb::Slice& v) {
    if (!WellFormed(k)) return true;
    DirEntry e;
    e.name.assign(k.data() + 9, k.size() - 9);
    uint64_t dir = ReadBe64(k.data() + 1);
    if (v.size() != kDirEntryValueSize) {
      std::string what = "dir " + std::to_string(dir) + " entry '" + e.name + "': the record is corrupt (" +
                         std::to_string(v.size()) + " bytes, not " + std::to_string(kDirEntryValueSize) + ")";
      return Corrupt(on_corrupt, {CorruptRecord::Kind::kDirEntry, dir, std::move(what), k.ToString()}, &inner);
    }
    const char* p = v.data();
    e.ino = Get<uint64_t>(p);
    e.mode = Get<uint32_t>(p);
    e.cookie = Get<uint64_t>(p);
    fn(dir, e);
    return true;
  });
  return inner.ok() ? st : inner;
}

Status MetaStore::ForEachCookieAll(const std::function<void(uint64_t, uint64_t, std::string_view)>& fn) {
  std::string prefix = Key(kCookie);
  return Scan(db_.get(), prefix, prefix, [&](const rocksdb::Slice& k, const rocksdb::Slice& v) {
    if (WellFormed(k)) fn(ReadBe64(k.data() + 1), ReadBe64(k.data() + 9), std::string_view(v.data(), v.size()));
    return true;
  });
}

namespace {
// Distinct inode numbers of the keys under `prefix` (prefix byte, be64 ino, ...).
Status ListOwners(rocksdb::DB* db, char prefix, std::vector<uint64_t>* inos) {
  return Scan(db, Key(prefix), Key(prefix), [&](const rocksdb::Slice& k, const rocksdb::Slice&) {
    if (!WellFormed(k)) return true;
    uint64_t ino = ReadBe64(k.data() + 1);
    if (inos->empty() || inos->back() != ino) inos->push_back(ino);
    return true;
  });
}
}  // namespace

Status MetaStore::ForEachMalformedKey(const CorruptFn& fn) {
  return Scan(db_.get(), "", "", [&](const rocksdb::Slice& k, const rocksdb::Slice&) {
    if (WellFormed(k)) return true;
    std::string what = "key " + Hex(k) + ": not a key this format writes (";
    if (k.empty()) {
      what += "empty)";
    } else if (const size_t want = KeyLength(k[0]); want == SIZE_MAX) {
      what += "unknown prefix)";
    } else {
      what += "a '" + std::string(1, k[0]) + "' key is " +
              (want == kNamedKey ? std::string("longer than 9 bytes") : std::to_string(want) + " bytes") + ", this one " +
              std::to_string(k.size()) + ")";
    }
    fn({CorruptRecord::Kind::kKey, 0, std::move(what), k.ToString()});
    return true;
  });
}

void MetaStore::DeleteInode(uint64_t ino, MetaBatch* b) {
  b->wb_->Delete(Key(kInode, ino));
  b->wb_->Delete(Key(kSymlink, ino));
  b->wb_->Delete(Key(kOrphan, ino));
  // A file of very many extents takes one range tombstone instead: rare, and
  // cheaper than a batch of that many keys built under the namespace lock.
  constexpr size_t kMaxPointDeletes = 4096;
  const Status applied = ApplyDeferredFor(ino);  // the scans must see held extents (else: a range tombstone)
  for (char prefix : {kXattr, kExtent}) {
    const std::string p = Key(prefix, ino);
    std::vector<std::string> keys;
    Status st = applied;
    if (st.ok()) st = Scan(db_.get(), p, p, [&](const rocksdb::Slice& k, const rocksdb::Slice&) {
      keys.push_back(k.ToString());
      return keys.size() <= kMaxPointDeletes;
    });
    if (st.ok() && keys.size() <= kMaxPointDeletes) {
      for (const std::string& k : keys) b->wb_->Delete(k);
    } else {
      b->wb_->DeleteRange(p, Key(prefix, ino + 1));  // as correct, only slower for later reads
    }
  }
}

Status MetaStore::ListSymlinkOwners(std::vector<uint64_t>* inos) { return ListOwners(db_.get(), kSymlink, inos); }
Status MetaStore::ListXattrOwners(std::vector<uint64_t>* inos) { return ListOwners(db_.get(), kXattr, inos); }

Status MetaStore::Commit(MetaBatch* batch, bool sync) {
  if (read_only_) return Status::Error(EROFS, "the metadata store is open read-only");
  // Armed before the batch can reach any buffer the barrier guards.
  if (!batch->data_durable_) barrier_->Arm();
  {
    // One writer at a time: a commit is a memtable insert and a buffer append
    // (no IO), so RocksDB's group commit would gain nothing, and its leader
    // reading other threads' batches is synchronized where TSan cannot see.
    std::lock_guard l(commit_mu_);
    DEFERFS_RETURN_IF_ERROR(ApplyDeferredLocked());
    DEFERFS_RETURN_IF_ERROR(FromRocks(db_->Write(rocksdb::WriteOptions(), batch->wb_.get()), "commit"));
  }
  landed_.fetch_add(1, std::memory_order_acq_rel);
  commits_.fetch_add(1, std::memory_order_relaxed);
  return sync ? SyncWal() : Status::Ok();
}

Status MetaStore::CommitDeferred(MetaBatch* batch) {
  if (read_only_) return Status::Error(EROFS, "the metadata store is open read-only");
  // Only inode and extent records are held: the reads that write out held
  // changes (ApplyDeferredFor) are the ones of those. Each key's inode is
  // noted for them, as landing with the next write-out. A batch with
  // anything else is committed at once instead, after the held ones.
  struct Append : rocksdb::WriteBatch::Handler {
    std::vector<DeferredOp>* ops;
    std::unordered_map<uint64_t, uint64_t>* inos;
    uint64_t writeout;
    uint64_t last_ino = 0;
    // One put (v given) or delete: refused unless it is an inode or extent record.
    rocksdb::Status Take(uint32_t cf, const rocksdb::Slice& k, const rocksdb::Slice* v) {
      const bool ino_keyed = cf == 0 && WellFormed(k) && (k[0] == kInode || k[0] == kExtent);
      if (!ino_keyed) return Refuse();
      ops->push_back({k.ToString(), v ? v->ToString() : std::string(), v == nullptr});
      const uint64_t ino = ReadBe64(k.data() + 1);
      if (ino != last_ino) (*inos)[ino] = writeout;  // a batch is nearly always one inode's
      last_ino = ino;
      return rocksdb::Status::OK();
    }
    rocksdb::Status PutCF(uint32_t cf, const rocksdb::Slice& k, const rocksdb::Slice& v) override { return Take(cf, k, &v); }
    rocksdb::Status DeleteCF(uint32_t cf, const rocksdb::Slice& k) override { return Take(cf, k, nullptr); }
    // The Handler's defaults would skip these without a word; range deletes
    // and the rest its defaults refuse.
    rocksdb::Status SingleDeleteCF(uint32_t, const rocksdb::Slice&) override { return Refuse(); }
    rocksdb::Status MergeCF(uint32_t, const rocksdb::Slice&, const rocksdb::Slice&) override { return Refuse(); }
    static rocksdb::Status Refuse() { return rocksdb::Status::NotSupported("held: puts and deletes only"); }
  } append;
  // Armed now, as Commit() does: a device flush from here on (an fsync's)
  // covers the data these changes make reachable, whenever they land.
  if (!batch->data_durable_) barrier_->Arm();
  bool taken;
  size_t held;
  {
    std::lock_guard l(deferred_mu_);
    if (!deferred_error_.ok()) return deferred_error_;
    // Held whole or not at all.
    const size_t before = deferred_.size();
    append.ops = &deferred_;
    append.inos = &held_inos_;
    append.writeout = writeouts_taken_ + 1;
    const rocksdb::Status it = batch->wb_->Iterate(&append);
    taken = it.ok();
    if (!taken) {
      deferred_.resize(before);  // an inode noted stays noted: at worst a read writes out early
      // Refused (by Append, or by the Handler's defaults): committed below.
      if (!it.IsNotSupported() && !it.IsInvalidArgument()) return FromRocks(it, "deferred commit");
    } else {
      ++deferred_batches_;
      deferred_ops_.fetch_add(deferred_.size() - before, std::memory_order_relaxed);
    }
    held = deferred_.size();
  }
  if (!taken) return Commit(batch);  // which counts it
  commits_.fetch_add(1, std::memory_order_relaxed);
  // Without the thread (a store not opened by Open()), or when it cannot
  // keep up, the caller writes them.
  if (held >= kDeferredMaxOps || (held >= kDeferredOps && !writer_.joinable())) return ApplyDeferred();
  if (held >= kDeferredOps) deferred_cv_.notify_one();
  return Status::Ok();
}

void MetaStore::DeferredWriterMain() {
  pthread_setname_np(pthread_self(), "deferfs-meta");
  std::unique_lock l(deferred_mu_);
  for (;;) {
    // After a failure nothing is written again: wait for the stop.
    deferred_cv_.wait(l, [this] {
      return writer_stop_ || (deferred_.size() >= kDeferredOps && deferred_error_.ok());
    });
    if (writer_stop_) return;
    l.unlock();
    (void)ApplyDeferred();  // a failure stays in deferred_error_ for the next caller
    l.lock();
  }
}

Status MetaStore::ApplyDeferred() {
  // Nothing held, nothing being written, no failure (a failed write-out
  // never counts its changes off): no lock.
  if (deferred_ops_.load(std::memory_order_acquire) == 0) return Status::Ok();
  std::lock_guard l(commit_mu_);
  return ApplyDeferredLocked();
}

Status MetaStore::ApplyDeferredFor(uint64_t ino) {
  if (deferred_ops_.load(std::memory_order_acquire) == 0) return Status::Ok();
  uint64_t writeout;
  {
    std::lock_guard l(deferred_mu_);
    if (!deferred_error_.ok()) return deferred_error_;
    auto it = held_inos_.find(ino);
    if (it == held_inos_.end()) return Status::Ok();  // none held, or landed
    writeout = it->second;
  }
  // The write-out that lands them is under way (it holds commit_mu_: wait for
  // it) or still to come (make it now).
  std::lock_guard c(commit_mu_);
  {
    std::lock_guard l(deferred_mu_);
    if (writeouts_landed_ >= writeout || !deferred_error_.ok()) return deferred_error_;
  }
  return ApplyDeferredLocked();
}

// Takes the held changes and writes them. commit_mu_ keeps them in order with
// every other write; appends go on meanwhile, into a fresh vector.
Status MetaStore::ApplyDeferredLocked() {
  std::vector<DeferredOp> ops;
  uint64_t batches, writeout;
  {
    std::lock_guard l(deferred_mu_);
    if (deferred_.empty() || !deferred_error_.ok()) return deferred_error_;
    ops.swap(deferred_);
    batches = std::exchange(deferred_batches_, 0);
    writeout = ++writeouts_taken_;
  }
  // Stable: of several changes to one key, the last in commit order wins.
  std::stable_sort(ops.begin(), ops.end(), [](const DeferredOp& a, const DeferredOp& b) { return a.key < b.key; });
  rocksdb::WriteBatch wb;
  rocksdb::Status s;
  for (size_t i = 0; i < ops.size() && s.ok(); ++i) {
    if (i + 1 < ops.size() && ops[i + 1].key == ops[i].key) continue;
    s = ops[i].del ? wb.Delete(ops[i].key) : wb.Put(ops[i].key, ops[i].value);
  }
  if (s.ok()) s = db_->Write(rocksdb::WriteOptions(), &wb);  // each batch armed the barrier
  if (s.ok()) {
    // Counted only now, when they are in the WAL buffer: SyncWal() takes
    // the count as what its write-out covers. And a reader that sees 0
    // must find them in RocksDB.
    landed_.fetch_add(batches, std::memory_order_acq_rel);
    {
      std::lock_guard l(deferred_mu_);
      writeouts_landed_ = writeout;
      std::erase_if(held_inos_, [writeout](const auto& kv) { return kv.second <= writeout; });
    }
    deferred_ops_.fetch_sub(ops.size(), std::memory_order_release);
    return Status::Ok();
  }
  std::lock_guard l(deferred_mu_);
  deferred_error_ = FromRocks(s, "deferred commit");
  return deferred_error_;
}

Status MetaStore::SyncWal() {
  if (read_only_) return Status::Ok();  // nothing was written
  DEFERFS_RETURN_IF_ERROR(ApplyDeferred());
  std::lock_guard l(sync_mu_);
  // Counted after their Write() returned, so all of `upto` is in the buffer.
  const uint64_t upto = landed_.load(std::memory_order_acquire);
  if (upto == synced_.load(std::memory_order_relaxed)) return Status::Ok();
  DEFERFS_RETURN_IF_ERROR(FromRocks(db_->FlushWAL(/*sync=*/true), "wal sync"));
  synced_.store(upto, std::memory_order_relaxed);
  wal_syncs_.fetch_add(1, std::memory_order_relaxed);
  return Status::Ok();
}

}  // namespace deferfs
