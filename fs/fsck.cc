// Fsck: loads every record of the store into memory, checks the records
// against each other and the superblock, and plans each repair as it finds
// the problem. The plan is applied in one synced MetaBatch at the end, and
// the checks after a planned repair look at the repaired state, so the
// report says what the store holds once --repair is done.
#include "fs/fsck.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <deque>
#include <map>
#include <set>
#include <utility>

#include "backend/allocator.h"
#include "backend/clock.h"
#include "fs/extent_map.h"

namespace deferfs {
namespace {

std::string Num(uint64_t v) { return std::to_string(v); }

std::string Oct(uint32_t mode) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0%o", mode);
  return buf;
}

const char* TypeNameOrNull(uint32_t mode) {
  switch (mode & S_IFMT) {
    case S_IFREG: return "regular file";
    case S_IFDIR: return "directory";
    case S_IFLNK: return "symlink";
    case S_IFCHR: return "character device";
    case S_IFBLK: return "block device";
    case S_IFIFO: return "fifo";
    case S_IFSOCK: return "socket";
    default: return nullptr;
  }
}

std::string TypeName(uint32_t mode) {
  const char* t = TypeNameOrNull(mode);
  return t ? t : "file of unknown type " + Oct(mode & S_IFMT);
}

std::string ExtentText(const ExtentRecord& e) {
  return "extent lblk " + Num(e.lblk) + " len " + Num(e.len) + " pblk " + Num(e.pblk);
}

std::string Plural(uint64_t n, const std::string& one, const std::string& many) {
  return Num(n) + " " + (n == 1 ? one : many);
}

struct Node {
  InodeRecord rec;  // as stored
  InodeRecord fix;  // as repair leaves it
  bool dirty = false;
  uint32_t refs = 0;      // kept entries naming it
  uint32_t subdirs = 0;   // kept entries in it naming directories
  uint32_t children = 0;  // kept entries in it
  uint32_t added_refs = 0, added_subdirs = 0;  // planned /lost+found links
  uint64_t entry_dir = 0;  // directories: the dir holding its entry
  uint64_t blocks = 0;
  bool orphan = false;
  bool has_symlink = false;
  bool deleted = false;    // repair deletes it
  bool relinked = false;   // repair links it into /lost+found
  bool created = false;    // repair writes it anew: /lost+found, or a salvaged file
  bool reached = false;

  bool is_dir() const { return S_ISDIR(rec.mode); }
};

struct Entry {
  uint64_t dir = 0;
  DirEntry e;               // as repair leaves it
  uint64_t old_cookie = 0;  // as stored
  bool keep = true;
  std::string Tag() const { return "dir " + Num(dir) + " entry '" + e.name + "'"; }
};

bool EmptyOrWraps(const ExtentRecord& e) {
  return e.len == 0 || e.lblk + e.len < e.lblk || e.pblk + e.len < e.pblk;
}

struct LocatedExtent {
  uint64_t ino;
  ExtentRecord e;
  bool leaked;
};

class Checker {
 public:
  Checker(const Superblock& sb, uint64_t device_bytes, MetaStore* meta, const FsckOptions& opt, FsckReport* r)
      : sb_(sb), device_bytes_(device_bytes), meta_(meta), opt_(opt), r_(r) {}

  Status Run() {
    Phase("reading metadata");
    DEFERFS_RETURN_IF_ERROR(Load());
    r_->inodes = nodes_.size();
    r_->entries = entries_.size();
    for (const auto& [ino, n] : nodes_) r_->directories += n.is_dir();
    Phase("checking inodes");
    CheckSuperblock();
    CheckCorrupt();
    CheckInodes();
    CheckLeakedKeys();
    Phase("checking extents and free space");
    CheckExtents();
    Phase("checking directories");
    CheckEntries();
    CheckCookies();
    Phase("checking link counts and reachability");
    CheckOrphansAndReachability();
    CheckLinkCounts();
    DEFERFS_RETURN_IF_ERROR(CheckSymlinks());
    if (!root_ok_) {
      // Every repair assumes the root: without it each entry of / reads as
      // dangling and each inode under it as lost, and repairing that would
      // unlink the whole tree.
      r_->repairable = 0;
      r_->remaining = r_->errors.size();
      r_->repairs.clear();
      r_->notes.push_back("nothing is repaired without a root directory");
      return Status::Ok();
    }
    if (!opt_.repair) return Status::Ok();
    Phase("repairing");
    return Repair();
  }

 private:
  void Phase(const std::string& p) {
    if (opt_.progress) opt_.progress(p);
  }
  // An inconsistency; `fixable` if the planned repair removes it.
  void Error(std::string line, bool fixable) {
    r_->errors.push_back(std::move(line));
    if (fixable) r_->repairable++;
    if (!fixable || !opt_.repair) r_->remaining++;
  }
  // What repair does, reported only when repairing.
  void Fix(std::string line) {
    if (opt_.repair) r_->repairs.push_back(std::move(line));
  }
  Node& Dirty(Node& n) {
    n.dirty = true;
    return n;
  }

  Status Load() {
    auto corrupt = [&](CorruptRecord r) { corrupt_.push_back(std::move(r)); };
    DEFERFS_RETURN_IF_ERROR(meta_->ForEachInode(
        [&](const InodeRecord& rec) {
          Node& n = nodes_[rec.ino];
          n.rec = n.fix = rec;
        },
        corrupt));
    DEFERFS_RETURN_IF_ERROR(meta_->ForEachDirEntryAll(
        [&](uint64_t dir, const DirEntry& e) { entries_.push_back(Entry{dir, e, e.cookie}); }, corrupt));
    DEFERFS_RETURN_IF_ERROR(meta_->ForEachCookieAll([&](uint64_t dir, uint64_t cookie, std::string_view name) {
      cookies_[{dir, cookie}] = std::string(name);
    }));
    DEFERFS_RETURN_IF_ERROR(meta_->ForEachExtentAll(
        [&](uint64_t ino, const ExtentRecord& e) { extents_.push_back({ino, e, nodes_.count(ino) == 0}); },
        corrupt));
    DEFERFS_RETURN_IF_ERROR(meta_->ForEachMalformedKey(corrupt));
    std::vector<uint64_t> v;
    DEFERFS_RETURN_IF_ERROR(meta_->ListOrphans(&v));
    orphans_.insert(v.begin(), v.end());
    v.clear();
    DEFERFS_RETURN_IF_ERROR(meta_->ListSymlinkOwners(&v));
    symlinks_.insert(v.begin(), v.end());
    v.clear();
    DEFERFS_RETURN_IF_ERROR(meta_->ListXattrOwners(&v));
    xattrs_.insert(v.begin(), v.end());
    for (uint64_t ino : orphans_) {
      if (auto it = nodes_.find(ino); it != nodes_.end()) it->second.orphan = true;
    }
    for (uint64_t ino : symlinks_) {
      if (auto it = nodes_.find(ino); it != nodes_.end()) it->second.has_symlink = true;
    }
    next_ino_ = meta_->next_ino();
    return Status::Ok();
  }

  void CheckSuperblock() {
    if (device_bytes_ < sb_.device_bytes) {
      Error("superblock: the filesystem is " + Num(sb_.device_bytes) + " bytes, but the device has only " +
                Num(device_bytes_) + " (truncated)",
            false);
    }
  }

  // Records too damaged to decode, and keys of no record's shape. Repair
  // deletes them, as e2fsck clears an inode it cannot read: the checks below
  // already see the store without them (an entry naming a deleted inode is
  // dangling, the inode of a deleted entry unreachable, the blocks of a
  // deleted extent free). An inode with extents is rebuilt instead (Salvage).
  // The root's inode is not one of them: without a root nothing is repaired
  // (Run).
  void CheckCorrupt() {
    for (const CorruptRecord& r : corrupt_) {
      if (r.kind == CorruptRecord::Kind::kInode && r.ino == kRootIno) {
        root_corrupt_ = true;
        Error(r.what, false);
        continue;
      }
      Error(r.what, true);
      if (r.kind == CorruptRecord::Kind::kInode && Salvage(r.ino)) continue;
      Fix(r.what + (r.kind == CorruptRecord::Kind::kExtent ? ": deleted (that part of the file now reads as zeros)"
                                                          : ": deleted"));
    }
  }

  // Only regular files have extents, so an unreadable inode that has them
  // was one: it is rebuilt as a file owned by root, mode 0600, its size the
  // end of its last extent, and keeps the names its entries give it (or goes
  // to /lost+found). Its data is worth more than a guess at its attributes.
  // Not an orphan: it had no name, and the next mount would free it. Nor one
  // whose extents are themselves in doubt (invalid, or overlapping each
  // other or another file's), or that has a symlink target: those stay
  // leaked records that repair deletes, as before, rather than become
  // errors no repair can fix.
  bool Salvage(uint64_t ino) {
    if (orphans_.count(ino) || symlinks_.count(ino)) return false;
    const uint64_t first = sb_.first_data_block, last = sb_.block_count();
    const uint64_t max_blocks = UINT64_MAX / sb_.block_size;
    std::vector<LocatedExtent*> mine;
    uint64_t end = 0;
    for (LocatedExtent& x : extents_) {
      if (x.ino != ino) continue;
      const ExtentRecord& e = x.e;
      if (EmptyOrWraps(e) || e.lblk + e.len > max_blocks || e.pblk < first || e.pblk + e.len > last || e.lblk < end ||
          e.state > static_cast<uint8_t>(ExtentState::kUnwritten)) {
        return false;  // extents are in lblk order: e.lblk < end is an overlap
      }
      end = e.lblk + e.len;
      mine.push_back(&x);
    }
    if (mine.empty()) return false;
    for (const LocatedExtent& other : extents_) {
      if (other.ino == ino || other.e.pblk + other.e.len < other.e.pblk) continue;
      for (const LocatedExtent* x : mine) {
        if (x->e.pblk < other.e.pblk + other.e.len && other.e.pblk < x->e.pblk + x->e.len) return false;
      }
    }
    for (LocatedExtent* x : mine) x->leaked = false;
    const uint64_t count = mine.size();
    Node& n = nodes_[ino];
    n.rec.ino = ino;
    n.rec.mode = S_IFREG | 0600;
    n.rec.size = end * sb_.block_size;
    n.rec.atime_ns = n.rec.mtime_ns = n.rec.ctime_ns = n.rec.crtime_ns = NowNs();
    n.rec.nlink = 1;
    n.fix = n.rec;
    n.dirty = true;
    n.created = true;
    r_->inodes++;
    const std::string how = "from its " + Plural(count, "extent", "extents") + " as a regular file of " +
                            Num(n.rec.size) + " bytes (owner root, mode 0600)";
    // A check says what repair will do: rebuild, where other records go.
    if (opt_.repair) Fix("ino " + Num(ino) + ": rebuilt " + how);
    else r_->notes.push_back("ino " + Num(ino) + ": --repair rebuilds it " + how);
    return true;
  }

  void CheckInodes() {
    auto root = nodes_.find(kRootIno);
    if (root_corrupt_) {
      // Reported by CheckCorrupt.
    } else if (root == nodes_.end()) {
      Error("ino 1: the root directory does not exist", false);
    } else if (!root->second.is_dir()) {
      Error("ino 1: the root is a " + TypeName(root->second.rec.mode) + ", not a directory", false);
    } else {
      root_ok_ = true;
    }
    for (const auto& [ino, n] : nodes_) {
      if (TypeNameOrNull(n.rec.mode) == nullptr) {
        Error("ino " + Num(ino) + ": invalid file type in mode " + Oct(n.rec.mode), false);
      }
    }
    uint64_t max_ino = nodes_.empty() ? kRootIno : nodes_.rbegin()->first;
    if (next_ino_ == 0) {
      Error("inode counter: missing or corrupt (the store cannot be mounted without it)", true);
      SetInodeCounter();
    } else if (next_ino_ <= max_ino) {
      Error("inode counter: next inode number is " + Num(next_ino_) + ", but ino " + Num(max_ino) +
                " exists (a create would reuse it)",
            true);
      SetInodeCounter();
    }
  }

  // Past every inode number anything in the store is keyed by, records of
  // inodes that are gone included: a new inode starts with no history.
  void SetInodeCounter() {
    uint64_t max = nodes_.empty() ? kRootIno : nodes_.rbegin()->first;
    for (const CorruptRecord& r : corrupt_) {
      if (r.kind != CorruptRecord::Kind::kDirEntry) max = std::max(max, r.ino);
    }
    for (const LocatedExtent& e : extents_) max = std::max(max, e.ino);
    for (const std::set<uint64_t>* owners : {&orphans_, &symlinks_, &xattrs_}) {
      if (!owners->empty()) max = std::max(max, *owners->rbegin());
    }
    next_ino_ = max + 1;
    put_next_ino_ = true;
    Fix("inode counter: set to " + Num(next_ino_));
  }

  // Records keyed by an inode that has no inode record: extents (leaked
  // blocks), xattrs, a symlink target, an orphan mark.
  void CheckLeakedKeys() {
    struct Leak {
      uint64_t extents = 0, blocks = 0;
      bool xattrs = false, symlink = false, orphan = false;
    };
    std::map<uint64_t, Leak> leaks;
    for (const LocatedExtent& x : extents_) {
      if (!x.leaked) continue;
      leaks[x.ino].extents++;
      leaks[x.ino].blocks += x.e.len;
    }
    for (uint64_t ino : xattrs_) {
      if (!nodes_.count(ino)) leaks[ino].xattrs = true;
    }
    for (uint64_t ino : symlinks_) {
      if (!nodes_.count(ino)) leaks[ino].symlink = true;
    }
    for (uint64_t ino : orphans_) {
      if (!nodes_.count(ino)) leaks[ino].orphan = true;
    }
    for (const auto& [ino, l] : leaks) {
      std::vector<std::string> what;
      if (l.extents) {
        what.push_back(Plural(l.extents, "extent", "extents") + " (" + Plural(l.blocks, "block", "blocks") + ")");
      }
      if (l.xattrs) what.push_back("xattrs");
      if (l.symlink) what.push_back("a symlink target");
      if (l.orphan) what.push_back("an orphan record");
      std::string list;
      for (size_t i = 0; i < what.size(); i++) list += (i ? ", " : "") + what[i];
      Error("ino " + Num(ino) + ": no inode record, but its records remain (leaked): " + list, true);
      leaked_inos_.push_back(ino);
      Fix("ino " + Num(ino) + ": deleted the leaked records" +
          (l.blocks ? ", " + Plural(l.blocks, "block", "blocks") + " freed" : std::string()));
    }
  }

  void CheckExtents() {
    const uint64_t first = sb_.first_data_block, end = sb_.block_count();
    std::vector<const LocatedExtent*> live, all;
    const LocatedExtent* prev = nullptr;  // same inode, furthest logical end so far
    size_t errors_before = r_->errors.size();
    for (const LocatedExtent& x : extents_) {
      const ExtentRecord& e = x.e;
      const std::string tag = "ino " + Num(x.ino) + ": " + ExtentText(e);
      if (EmptyOrWraps(e)) {
        if (!x.leaked) Error(tag + " is empty or wraps around", false);
        continue;
      }
      all.push_back(&x);
      if (x.leaked) continue;
      live.push_back(&x);
      Node& n = nodes_[x.ino];
      n.blocks += e.len;
      if (e.state > static_cast<uint8_t>(ExtentState::kUnwritten)) {
        Error(tag + " has invalid state " + Num(e.state), false);
      }
      if (e.pblk < first || e.pblk + e.len > end) {
        Error(tag + " lies outside the data area, blocks [" + Num(first) + ", " + Num(end) + ")", false);
      }
      if (!S_ISREG(n.rec.mode)) {
        Error(tag + " belongs to a " + TypeName(n.rec.mode) + ", which has no data blocks",
              false);
      }
      if (prev != nullptr && prev->ino != x.ino) prev = nullptr;
      if (prev != nullptr && prev->e.lblk + prev->e.len > e.lblk) {
        Error(tag + " overlaps its " + ExtentText(prev->e) + " in logical blocks", false);
      }
      if (prev == nullptr || e.lblk + e.len > prev->e.lblk + prev->e.len) prev = &x;
    }
    // Across files by physical block: first among live extents (no repair can
    // decide the owner), then the overlaps deleting leaked records resolves.
    Sweep(live, /*only_leaked=*/false);
    Sweep(all, /*only_leaked=*/true);
    r_->extents = extents_.size();

    // The mount's own free-space rebuild must accept every extent, and leave
    // free exactly the complement of them.
    Allocator alloc(first, end);
    uint64_t rejected = 0, covered = 0;
    std::string why;
    for (const LocatedExtent& x : extents_) {
      Status s = alloc.MarkUsed({x.e.pblk, x.e.len});
      if (s.ok()) {
        covered += x.e.len;
      } else if (rejected++ == 0) {
        why = "ino " + Num(x.ino) + ": " + s.message();
      }
    }
    if (rejected > 0 && r_->errors.size() == errors_before) {
      Error("free space: the mount would refuse these extents (" + why + ")", false);
    }
    r_->total_blocks = alloc.total_blocks();
    r_->free_blocks = alloc.free_blocks();
    r_->used_blocks = r_->total_blocks - r_->free_blocks;
    if (rejected == 0 && r_->used_blocks != covered) {
      Error("free space: the allocator counts " + Num(r_->used_blocks) + " used blocks, but the extents cover " +
                Num(covered),
            false);
    }
  }

  // Reports every extent that starts inside one before it in physical order
  // (against the one reaching furthest, so each overlapping extent once).
  void Sweep(std::vector<const LocatedExtent*> v, bool only_leaked) {
    std::sort(v.begin(), v.end(), [](const LocatedExtent* a, const LocatedExtent* b) {
      return a->e.pblk != b->e.pblk ? a->e.pblk < b->e.pblk : a->ino < b->ino;
    });
    const LocatedExtent* holder = nullptr;
    for (const LocatedExtent* x : v) {
      if (holder != nullptr && x->e.pblk < holder->e.pblk + holder->e.len) {
        bool leaked = x->leaked || holder->leaked;
        if (leaked == only_leaked) {
          Error("ino " + Num(x->ino) + ": " + ExtentText(x->e) + " overlaps ino " + Num(holder->ino) + " " +
                    ExtentText(holder->e),
                leaked);
        }
      }
      if (holder == nullptr || x->e.pblk + x->e.len > holder->e.pblk + holder->e.len) holder = x;
    }
  }

  static bool BadName(const std::string& name) {
    return name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
           name.find('\0') != std::string::npos;
  }

  void Remove(Entry& en, const std::string& why) {
    Error(en.Tag() + ": " + why, true);
    en.keep = false;
    dirty_dirs_.insert(en.dir);
    Fix(en.Tag() + ": removed");
  }

  void CheckEntries() {
    for (Entry& en : entries_) {
      auto d = nodes_.find(en.dir);
      auto t = nodes_.find(en.e.ino);
      if (d == nodes_.end()) {
        Remove(en, "directory " + Num(en.dir) + " does not exist");
      } else if (!d->second.is_dir()) {
        Remove(en, "inode " + Num(en.dir) + " is not a directory");
      } else if (BadName(en.e.name)) {
        Remove(en, "invalid name");
      } else if (t == nodes_.end()) {
        Remove(en, "inode " + Num(en.e.ino) + " does not exist");
      } else if (en.e.ino == kRootIno) {
        Remove(en, "names the root directory");
      } else if ((en.e.mode & S_IFMT) != (t->second.rec.mode & S_IFMT) || (en.e.mode & ~S_IFMT) != 0) {
        Error(en.Tag() + ": type bits " + Oct(en.e.mode) + ", but inode " + Num(en.e.ino) + " has mode " +
                  Oct(t->second.rec.mode),
              true);
        en.e.mode = t->second.rec.mode & S_IFMT;
        dirty_dirs_.insert(en.dir);
        Fix(en.Tag() + ": type bits set to " + Oct(en.e.mode));
      }
    }
    // A directory has exactly one entry: keep the one ".." agrees with.
    std::map<uint64_t, std::vector<Entry*>> dir_names;
    for (Entry& en : entries_) {
      if (en.keep && nodes_[en.e.ino].is_dir()) dir_names[en.e.ino].push_back(&en);
    }
    for (auto& [ino, v] : dir_names) {
      if (v.size() < 2) continue;
      Entry* keeper = v.front();
      for (Entry* en : v) {
        if (en->dir == nodes_[ino].rec.parent) keeper = en;
      }
      for (Entry* en : v) {
        if (en == keeper) continue;
        Remove(*en, "names directory " + Num(ino) + ", which also has entry '" + keeper->e.name + "' in dir " +
                        Num(keeper->dir) + " (a directory hard link)");
      }
    }
    for (const Entry& en : entries_) {
      if (!en.keep) continue;
      Node& t = nodes_[en.e.ino];
      Node& d = nodes_[en.dir];
      t.refs++;
      d.children++;
      if (t.is_dir()) {
        d.subdirs++;
        t.entry_dir = en.dir;
      }
    }
  }

  // Readdir cookies: each entry's cookie is indexed under its name, unique
  // in its directory and below the directory's next cookie.
  void CheckCookies() {
    std::map<std::pair<uint64_t, std::string>, uint64_t> stored;  // (dir, name) -> cookie
    for (const Entry& en : entries_) stored[{en.dir, en.e.name}] = en.old_cookie;
    for (const auto& [key, name] : cookies_) {
      auto it = stored.find({key.first, name});
      if (it != stored.end() && it->second == key.second) continue;
      Error("dir " + Num(key.first) + ": readdir cookie " + Num(key.second) + " names '" + name +
                "', which has no entry with that cookie",
            true);
      dirty_dirs_.insert(key.first);
      Fix("dir " + Num(key.first) + ": removed readdir cookie " + Num(key.second));
    }

    for (size_t i = 0; i < entries_.size();) {
      size_t j = i;
      while (j < entries_.size() && entries_[j].dir == entries_[i].dir) j++;
      CheckDirCookies(entries_.data() + i, entries_.data() + j);
      i = j;
    }
  }

  void CheckDirCookies(Entry* begin, Entry* end) {
    std::set<uint64_t> used;
    std::vector<Entry*> renumber;
    auto indexed = [&](const Entry& en) {
      auto it = cookies_.find({en.dir, en.e.cookie});
      return it != cookies_.end() && it->second == en.e.name;
    };
    for (Entry* en = begin; en != end; en++) {
      if (en->keep && en->e.cookie >= kFirstDirCookie && indexed(*en)) used.insert(en->e.cookie);
    }
    for (Entry* en = begin; en != end; en++) {
      if (!en->keep || (en->e.cookie >= kFirstDirCookie && indexed(*en))) continue;
      const std::string c = "readdir cookie " + Num(en->e.cookie);
      if (en->e.cookie < kFirstDirCookie) {
        Error(en->Tag() + ": " + c + " is reserved for . and ..", true);
        renumber.push_back(en);
      } else if (cookies_.count({en->dir, en->e.cookie})) {
        Error(en->Tag() + ": " + c + " is indexed as entry '" + cookies_[{en->dir, en->e.cookie}] + "'", true);
        renumber.push_back(en);
      } else {
        Error(en->Tag() + ": " + c + " has no index record", true);
        if (used.insert(en->e.cookie).second) {
          Fix(en->Tag() + ": re-indexed " + c);
        } else {
          renumber.push_back(en);
        }
      }
      dirty_dirs_.insert(en->dir);
    }
    if (std::none_of(begin, end, [](const Entry& en) { return en.keep; })) return;
    Node& dir = nodes_[begin->dir];
    if (!used.empty() && *used.rbegin() >= dir.fix.next_cookie) {
      Error("dir " + Num(begin->dir) + ": next readdir cookie is " + Num(dir.fix.next_cookie) +
                ", but an entry has cookie " + Num(*used.rbegin()),
            true);
      Dirty(dir).fix.next_cookie = *used.rbegin() + 1;
      Fix("dir " + Num(begin->dir) + ": next readdir cookie set to " + Num(dir.fix.next_cookie));
    }
    for (Entry* en : renumber) {
      en->e.cookie = Dirty(dir).fix.next_cookie++;
      Fix(en->Tag() + ": readdir cookie set to " + Num(en->e.cookie));
    }
  }

  // Decides the fate of every inode no entry names (other than the root):
  // an orphan or a leaked unlinked inode is deleted, anything else that is
  // still linked or holds entries goes to /lost+found. Then checks that the
  // tree (with those links) reaches every inode.
  void CheckOrphansAndReachability() {
    std::vector<uint64_t> lost;
    for (auto& [ino, n] : nodes_) {
      const std::string tag = "ino " + Num(ino);
      if (ino == kRootIno || n.refs > 0) {
        if (n.orphan) {
          const std::string links =
              ino == kRootIno ? std::string("the root") : Plural(n.refs, "directory entry", "directory entries");
          Error(tag + ": on the orphan list, but it is linked (" + links + "): the next mount would delete it", true);
          unorphan_.push_back(ino);
          Fix(tag + ": removed from the orphan list");
        }
        continue;
      }
      if (n.children > 0 || (n.rec.nlink > 0 && !n.orphan)) {
        lost.push_back(ino);
        n.relinked = true;
        if (n.orphan) {
          unorphan_.push_back(ino);
          Fix(tag + ": removed from the orphan list");
        }
        continue;
      }
      n.deleted = true;
      deletes_.push_back(ino);
      const std::string blocks = Plural(n.blocks, "block", "blocks");
      if (!n.orphan) {
        Error(tag + ": nlink 0 and no directory entry names it, but it is not on the orphan list (leaked, " + blocks +
                  ")",
              true);
        Fix(tag + ": deleted the leaked inode, " + blocks + " freed");
      } else if (n.rec.nlink == 0) {
        r_->notes.push_back(tag + ": unlinked while in use (orphan), " + blocks + ": the next mount frees it");
        Fix(tag + ": freed the orphan, " + blocks);
      } else {
        Error(tag + ": on the orphan list with nlink " + Num(n.rec.nlink) +
                  ", but no directory entry names it: the next mount frees it",
              true);
        Fix(tag + ": freed the orphan, " + blocks);
      }
    }

    if (!root_ok_) {
      for (uint64_t ino : lost) Error("ino " + Num(ino) + ": no directory entry names it (unreachable)", false);
      return;
    }
    std::map<uint64_t, std::vector<uint64_t>> tree;  // dir -> its subdirectories
    for (const Entry& en : entries_) {
      if (en.keep && nodes_[en.e.ino].is_dir()) tree[en.dir].push_back(en.e.ino);
    }
    if (!lost.empty()) {
      uint64_t lf = LostAndFound(&tree);
      Node& lfn = nodes_[lf];
      for (uint64_t ino : lost) {
        Node& n = nodes_[ino];
        Error("ino " + Num(ino) + ": nlink " + Num(n.rec.nlink) +
                  (n.children ? ", " + Plural(n.children, "entry", "entries") : std::string()) +
                  ", but no directory entry names it (unreachable)",
              true);
        Entry en{lf, DirEntry{"#" + Num(ino), ino, n.rec.mode & S_IFMT, Dirty(lfn).fix.next_cookie++}, 0};
        added_.push_back(en);
        n.added_refs++;
        if (n.is_dir()) {
          lfn.added_subdirs++;
          n.entry_dir = lf;
          tree[lf].push_back(ino);
        }
        Fix("ino " + Num(ino) + ": linked as /" + lost_found_name_ + "/" + en.e.name);
      }
    }
    std::deque<uint64_t> todo{kRootIno};
    nodes_[kRootIno].reached = true;
    while (!todo.empty()) {
      uint64_t d = todo.front();
      todo.pop_front();
      for (uint64_t sub : tree[d]) {
        if (!nodes_[sub].reached) {
          nodes_[sub].reached = true;
          todo.push_back(sub);
        }
      }
    }
    for (const auto& [ino, n] : nodes_) {
      if (n.is_dir() && !n.reached && !n.deleted) {
        Error("ino " + Num(ino) + ": directory unreachable from the root (a directory cycle)", false);
      }
    }
  }

  // The /lost+found directory, created in the plan if the root has none.
  uint64_t LostAndFound(std::map<uint64_t, std::vector<uint64_t>>* tree) {
    std::set<std::string> root_names;
    for (const Entry& en : entries_) {
      if (!en.keep || en.dir != kRootIno) continue;
      if (en.e.name == "lost+found" && nodes_[en.e.ino].is_dir()) return en.e.ino;
      root_names.insert(en.e.name);
    }
    std::string name = "lost+found";
    for (int i = 1; root_names.count(name); i++) name = "lost+found." + Num(i);
    const uint64_t ino = next_ino_++;
    put_next_ino_ = true;
    Node& n = nodes_[ino];
    n.rec.ino = ino;
    n.rec.mode = S_IFDIR | 0700;
    n.rec.nlink = 2;
    n.rec.atime_ns = n.rec.mtime_ns = n.rec.ctime_ns = n.rec.crtime_ns = NowNs();
    n.rec.parent = kRootIno;
    n.rec.next_cookie = kFirstDirCookie;
    n.fix = n.rec;
    n.dirty = true;
    n.created = true;
    n.added_refs = 1;
    n.entry_dir = kRootIno;
    Node& root = nodes_[kRootIno];
    added_.push_back(Entry{kRootIno, DirEntry{name, ino, S_IFDIR, Dirty(root).fix.next_cookie++}, 0});
    root.added_subdirs++;
    (*tree)[kRootIno].push_back(ino);
    Fix("created /" + name + " (ino " + Num(ino) + ")");
    lost_found_name_ = name;
    return ino;
  }

  void CheckLinkCounts() {
    for (auto& [ino, n] : nodes_) {
      if (n.deleted) continue;
      const std::string tag = (n.is_dir() ? "dir " : "ino ") + Num(ino);
      uint32_t found = n.is_dir() ? 2 + n.subdirs : n.refs;
      uint32_t want = n.is_dir() ? found + n.added_subdirs : n.refs + n.added_refs;
      if (n.created) {
        n.fix.nlink = want;
        continue;
      }
      if (n.rec.nlink != found && !n.relinked) {
        Error(n.is_dir() ? tag + ": nlink " + Num(n.rec.nlink) + ", but it has " +
                               Plural(n.subdirs, "subdirectory", "subdirectories") + " (expected " + Num(found) + ")"
                         : tag + ": nlink " + Num(n.rec.nlink) + ", but " +
                               Plural(n.refs, "directory entry names", "directory entries name") + " it",
              true);
      }
      if (n.fix.nlink != want) {
        Dirty(n).fix.nlink = want;
        Fix(tag + ": nlink set to " + Num(want));
      }
      if (!n.is_dir()) continue;
      uint64_t parent = ino == kRootIno ? kRootIno : n.entry_dir;
      if (parent == 0 || n.fix.parent == parent) continue;
      if (!n.relinked) {
        Error(tag + ": parent (..) is " + Num(n.rec.parent) + ", but its entry is in dir " + Num(parent), true);
      }
      Dirty(n).fix.parent = parent;
      Fix(tag + ": parent (..) set to " + Num(parent));
    }
  }

  Status CheckSymlinks() {
    for (auto& [ino, n] : nodes_) {
      if (n.deleted) continue;
      const std::string tag = "ino " + Num(ino);
      bool is_link = S_ISLNK(n.rec.mode);
      if (is_link && !n.has_symlink) Error(tag + ": symlink without a target", false);
      if (!is_link && n.has_symlink) {
        Error(tag + ": has a symlink target, but is a " + TypeName(n.rec.mode),
              false);
      }
      if (!is_link || !n.has_symlink) continue;
      std::string target;
      DEFERFS_RETURN_IF_ERROR(meta_->GetSymlink(ino, &target));
      if (n.rec.size != target.size()) {
        Error(tag + ": symlink size " + Num(n.rec.size) + ", but its target has " + Num(target.size()) + " bytes",
              true);
        Dirty(n).fix.size = target.size();
        Fix(tag + ": size set to " + Num(target.size()));
      }
    }
    return Status::Ok();
  }

  Status Repair() {
    MetaBatch b;
    // Deletes first: in a batch the last operation on a key wins, and a Put
    // below may reuse a key a delete frees (a new /lost+found in place of a
    // corrupt entry of that name, or in an inode number whose records leaked).
    for (const CorruptRecord& r : corrupt_) b.DeleteCorrupt(r);  // never the root's: see Run()
    for (uint64_t ino : deletes_) meta_->DeleteInode(ino, &b);
    for (uint64_t ino : leaked_inos_) meta_->DeleteInode(ino, &b);
    for (uint64_t ino : unorphan_) b.DeleteOrphan(ino);
    // A directory with any change gets its whole index rewritten: every
    // stored entry and cookie record out, the repaired entries back in.
    for (uint64_t dir : dirty_dirs_) {
      Entry key;
      key.dir = dir;
      auto [begin, end] = std::equal_range(entries_.begin(), entries_.end(), key,
                                           [](const Entry& a, const Entry& b) { return a.dir < b.dir; });
      for (auto en = begin; en != end; ++en) b.DeleteDirEntry(dir, DirEntry{en->e.name, 0, 0, en->old_cookie});
      for (auto it = cookies_.lower_bound({dir, 0}); it != cookies_.end() && it->first.first == dir; ++it) {
        b.DeleteDirEntry(dir, DirEntry{it->second, 0, 0, it->first.second});
      }
      for (auto en = begin; en != end; ++en) {
        if (en->keep) b.PutDirEntry(dir, en->e);
      }
    }
    for (const Entry& en : added_) b.PutDirEntry(en.dir, en.e);
    for (const auto& [ino, n] : nodes_) {
      if (n.dirty && !n.deleted) b.PutInode(n.fix);
    }
    if (put_next_ino_) b.PutNextIno(next_ino_);
    if (b.empty()) return Status::Ok();
    return meta_->Commit(&b, /*sync=*/true);
  }

  const Superblock& sb_;
  const uint64_t device_bytes_;
  MetaStore* const meta_;
  const FsckOptions& opt_;
  FsckReport* const r_;

  std::map<uint64_t, Node> nodes_;
  std::vector<Entry> entries_;  // in store order: by dir, then name
  std::map<std::pair<uint64_t, uint64_t>, std::string> cookies_;  // (dir, cookie) -> name
  std::vector<LocatedExtent> extents_;  // in store order: by ino, then lblk
  std::set<uint64_t> orphans_, symlinks_, xattrs_;
  std::vector<CorruptRecord> corrupt_;
  bool root_ok_ = false;
  bool root_corrupt_ = false;
  uint64_t next_ino_ = 0;

  // The repair plan.
  std::set<uint64_t> dirty_dirs_;
  std::vector<Entry> added_;  // new entries: /lost+found and what it holds
  std::vector<uint64_t> unorphan_, deletes_, leaked_inos_;
  bool put_next_ino_ = false;
  std::string lost_found_name_ = "lost+found";
};

}  // namespace

Status Fsck(const Superblock& sb, uint64_t device_bytes, MetaStore* meta, const FsckOptions& opt,
            FsckReport* report) {
  *report = FsckReport{};
  return Checker(sb, device_bytes, meta, opt, report).Run();
}

}  // namespace deferfs
