// Fsck against a real MetaStore that a test builds record by record, then
// corrupts on purpose: each corruption must be reported as its precise line,
// --repair must fix what it claims to, and a fresh check afterwards must be
// clean (or still report what repair must not touch).
#include "fs/fsck.h"

#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <sys/stat.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "fs/extent_map.h"
#include "tests/unit/temp_dir.h"

namespace deferfs {
namespace {

constexpr Uuid kUuid = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
constexpr uint64_t kDeviceBytes = 64ull << 20;  // data area: blocks [1, 16384)

std::string Lines(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& l : v) s += "  " + l + "\n";
  return s;
}

::testing::AssertionResult HasLine(const std::vector<std::string>& v, const std::string& text) {
  for (const auto& l : v) {
    if (l.find(text) != std::string::npos) return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no line mentions \"" << text << "\" in:\n" << Lines(v);
}

class FsckTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(tmp_.path().empty());
    dir_ = tmp_.Sub("meta");
    ASSERT_TRUE(MetaStore::Create(dir_, kUuid, 0, 0).ok());
    sb_.uuid = kUuid;
    sb_.device_bytes = kDeviceBytes;
    Reopen();
    ASSERT_TRUE(meta_->GetInode(kRootIno, &recs_[kRootIno]).ok());
  }

  // A fresh open, as the next mount (or fsck) sees the store.
  void Reopen(bool for_fsck = false) {
    meta_.reset();
    Status s = for_fsck ? MetaStore::OpenForFsck(dir_, kUuid, &meta_) : MetaStore::Open(dir_, kUuid, &meta_);
    ASSERT_TRUE(s.ok()) << s.message();
  }

  // Damage no MetaBatch can do: writes (or, with `value` null, deletes) one
  // raw key, spelled as the store's format spells it (a prefix byte, then
  // big-endian numbers), through RocksDB itself. Leaves the store closed.
  static std::string RawKey(char prefix, uint64_t a, const std::string& rest = "") {
    std::string k(1, prefix);
    for (int i = 7; i >= 0; i--) k.push_back(static_cast<char>(a >> (i * 8)));
    return k + rest;
  }
  static std::string Be64(uint64_t v) { return RawKey('\0', v).substr(1); }
  void Raw(const std::string& key, const char* value) {
    meta_.reset();
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(), dir_, &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    rocksdb::WriteOptions wo;
    wo.sync = true;
    ASSERT_TRUE((value ? db->Put(wo, key, value) : db->Delete(wo, key)).ok());
  }
  bool RawExists(const std::string& key) {
    meta_.reset();
    rocksdb::DB* raw = nullptr;
    EXPECT_TRUE(rocksdb::DB::OpenForReadOnly(rocksdb::Options(), dir_, &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    std::string v;
    return db && db->Get(rocksdb::ReadOptions(), key, &v).ok();
  }

  void Commit(MetaBatch* b) { ASSERT_TRUE(meta_->Commit(b, true).ok()); }

  // Adds an inode named `name` in `dir` the way the filesystem does.
  uint64_t Add(uint64_t dir, const std::string& name, uint32_t mode, const std::string& target = "") {
    InodeRecord r;
    r.ino = next_ino_++;
    r.mode = mode;
    r.nlink = S_ISDIR(mode) ? 2 : 1;
    if (S_ISDIR(mode)) {
      r.parent = dir;
      r.next_cookie = kFirstDirCookie;
    }
    if (S_ISLNK(mode)) r.size = target.size();
    InodeRecord& d = recs_[dir];
    MetaBatch b;
    b.PutDirEntry(dir, DirEntry{name, r.ino, mode & S_IFMT, d.next_cookie++});
    if (S_ISDIR(mode)) d.nlink++;
    if (S_ISLNK(mode)) b.PutSymlink(r.ino, target);
    b.PutInode(d);
    b.PutInode(r);
    b.PutNextIno(next_ino_);
    recs_[r.ino] = r;
    Commit(&b);
    return r.ino;
  }
  uint64_t File(uint64_t dir, const std::string& name) { return Add(dir, name, S_IFREG | 0644); }
  uint64_t Dir(uint64_t dir, const std::string& name) { return Add(dir, name, S_IFDIR | 0755); }

  void Link(uint64_t ino, uint64_t dir, const std::string& name) {
    InodeRecord& d = recs_[dir];
    MetaBatch b;
    b.PutDirEntry(dir, DirEntry{name, ino, recs_[ino].mode & S_IFMT, d.next_cookie++});
    recs_[ino].nlink++;
    b.PutInode(d);
    b.PutInode(recs_[ino]);
    Commit(&b);
  }

  void Extent(uint64_t ino, uint64_t lblk, uint64_t len, uint64_t pblk, uint8_t state = 0) {
    MetaBatch b;
    b.PutExtent(ino, ExtentRecord{lblk, len, pblk, state});
    Commit(&b);
  }

  // Unlinks /name as if it stayed open: its entry goes, an orphan mark comes.
  void UnlinkWhileOpen(const std::string& name, uint64_t ino) {
    DirEntry e;
    ASSERT_TRUE(meta_->Lookup(kRootIno, name, &e).ok());
    MetaBatch b;
    b.DeleteDirEntry(kRootIno, e);
    b.PutOrphan(ino);
    Commit(&b);
  }

  // Rewrites an inode record as it is in recs_ after `change`.
  template <typename Fn>
  void Change(uint64_t ino, Fn&& change) {
    change(recs_[ino]);
    MetaBatch b;
    b.PutInode(recs_[ino]);
    Commit(&b);
  }

  FsckReport Check(bool repair = false) {
    Reopen(/*for_fsck=*/true);
    FsckOptions opt;
    opt.repair = repair;
    FsckReport r;
    Status s = Fsck(sb_, kDeviceBytes, meta_.get(), opt, &r);
    EXPECT_TRUE(s.ok()) << s.message();
    return r;
  }

  // Repairs, then a fresh check must find nothing.
  void RepairAndExpectClean() {
    FsckReport r = Check(true);
    EXPECT_TRUE(r.clean()) << "errors:\n" << Lines(r.errors) << "repairs:\n" << Lines(r.repairs);
    EXPECT_FALSE(r.repairs.empty());
    FsckReport again = Check();
    EXPECT_TRUE(again.errors.empty()) << "after repair:\n" << Lines(again.errors);
    EXPECT_TRUE(again.clean());
  }

  // The names in `dir`, in readdir order.
  std::vector<std::string> Names(uint64_t dir) {
    std::vector<std::string> names;
    EXPECT_TRUE(meta_->ReadDir(dir, 0, [&](const DirEntry& e) {
      names.push_back(e.name);
      return true;
    }).ok());
    return names;
  }

  InodeRecord Get(uint64_t ino) {
    InodeRecord r;
    EXPECT_TRUE(meta_->GetInode(ino, &r).ok()) << "ino " << ino;
    return r;
  }

  TempDir tmp_;
  std::string dir_;
  Superblock sb_;
  std::unique_ptr<MetaStore> meta_;
  std::map<uint64_t, InodeRecord> recs_;
  uint64_t next_ino_ = kRootIno + 1;
};

TEST_F(FsckTest, FreshStoreIsClean) {
  FsckReport r = Check();
  EXPECT_TRUE(r.errors.empty()) << Lines(r.errors);
  EXPECT_TRUE(r.clean());
  EXPECT_EQ(r.inodes, 1u);
  EXPECT_EQ(r.used_blocks, 0u);
  EXPECT_EQ(r.total_blocks, kDeviceBytes / kBlockSize - 1);
  EXPECT_EQ(r.free_blocks, r.total_blocks);
}

TEST_F(FsckTest, ConsistentTreeIsCleanAndCountsBlocks) {
  uint64_t d = Dir(kRootIno, "d");
  uint64_t sub = Dir(d, "sub");
  uint64_t f = File(d, "f");
  Link(f, kRootIno, "hard");
  Link(f, sub, "hard2");
  Add(sub, "ln", S_IFLNK | 0777, "../f");
  Extent(f, 0, 8, 100);
  Extent(f, 8, 2, 300, static_cast<uint8_t>(1));
  uint64_t g = File(kRootIno, "g");
  Extent(g, 4, 16, 108);

  FsckReport r = Check();
  EXPECT_TRUE(r.errors.empty()) << Lines(r.errors);
  EXPECT_TRUE(r.clean());
  EXPECT_EQ(r.inodes, 6u);
  EXPECT_EQ(r.directories, 3u);
  EXPECT_EQ(r.entries, 7u);
  EXPECT_EQ(r.extents, 3u);
  EXPECT_EQ(r.used_blocks, 26u);
  EXPECT_EQ(r.free_blocks, r.total_blocks - 26);
  // A repair of a clean store changes nothing.
  FsckReport rep = Check(true);
  EXPECT_TRUE(rep.repairs.empty()) << Lines(rep.repairs);
}

TEST_F(FsckTest, OverlappingExtentsAcrossFilesAreReportedAndNotRepaired) {
  uint64_t a = File(kRootIno, "a");
  uint64_t b = File(kRootIno, "b");
  Extent(a, 0, 8, 896);
  Extent(b, 4, 2, 900);
  const std::string line = "ino " + std::to_string(b) + ": extent lblk 4 len 2 pblk 900 overlaps ino " +
                           std::to_string(a) + " extent lblk 0 len 8 pblk 896";
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, line));
  EXPECT_FALSE(r.clean());
  EXPECT_EQ(r.repairable, 0u);

  FsckReport rep = Check(true);
  EXPECT_FALSE(rep.clean());
  EXPECT_EQ(rep.remaining, 1u) << Lines(rep.errors);
  int extents = 0;
  ASSERT_TRUE(meta_->ForEachExtent(b, [&](const ExtentRecord&) { extents++; }).ok());
  EXPECT_EQ(extents, 1) << "repair must not guess which file owns the blocks";
  EXPECT_TRUE(HasLine(Check().errors, line));
}

TEST_F(FsckTest, OverlapInsideOneFileAndBadExtentsAreReported) {
  uint64_t a = File(kRootIno, "a");
  Extent(a, 0, 8, 100);
  Extent(a, 4, 2, 500);             // logical overlap with lblk 0..8
  Extent(a, 20, 4, 0);              // block 0 is the superblock
  Extent(a, 30, 4, 16382);          // runs past the last block
  Extent(a, 40, 1, 600, 7);         // no such state
  uint64_t d = Dir(kRootIno, "d");
  Extent(d, 0, 1, 700);             // directories have no data blocks
  FsckReport r = Check();
  const std::string ino = "ino " + std::to_string(a) + ": ";
  EXPECT_TRUE(HasLine(r.errors, ino + "extent lblk 4 len 2 pblk 500 overlaps its extent lblk 0 len 8 pblk 100"));
  EXPECT_TRUE(HasLine(r.errors, ino + "extent lblk 20 len 4 pblk 0 lies outside the data area, blocks [1, 16384)"));
  EXPECT_TRUE(HasLine(r.errors, ino + "extent lblk 30 len 4 pblk 16382 lies outside the data area"));
  EXPECT_TRUE(HasLine(r.errors, ino + "extent lblk 40 len 1 pblk 600 has invalid state 7"));
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(d) + ": extent lblk 0 len 1 pblk 700 belongs to a directory"));
  EXPECT_EQ(r.repairable, 0u);
}

TEST_F(FsckTest, ExtentsOfAMissingInodeAreLeakedBlocksThatRepairFrees) {
  File(kRootIno, "a");
  MetaBatch b;
  b.PutExtent(99, ExtentRecord{0, 4, 2000, 0});
  b.PutXattr(99, "user.x", "v");
  b.PutSymlink(98, "gone");
  Commit(&b);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "ino 99: no inode record, but its records remain (leaked): 1 extent (4 blocks), xattrs"));
  EXPECT_TRUE(HasLine(r.errors, "ino 98: no inode record, but its records remain (leaked): a symlink target"));
  EXPECT_EQ(r.used_blocks, 4u);

  RepairAndExpectClean();
  int extents = 0;
  ASSERT_TRUE(meta_->ForEachExtentAll([&](uint64_t, const ExtentRecord&) { extents++; }).ok());
  EXPECT_EQ(extents, 0);
  std::vector<std::string> names;
  ASSERT_TRUE(meta_->ListXattrs(99, &names).ok());
  EXPECT_TRUE(names.empty());
  EXPECT_EQ(Check().used_blocks, 0u);
}

TEST_F(FsckTest, LeakedExtentOverlappingALiveOneIsResolvedByRepair) {
  uint64_t a = File(kRootIno, "a");
  Extent(a, 0, 8, 896);
  MetaBatch b;
  b.PutExtent(77, ExtentRecord{0, 2, 900, 0});
  Commit(&b);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "ino 77: extent lblk 0 len 2 pblk 900 overlaps ino " + std::to_string(a)));
  EXPECT_EQ(r.repairable, r.errors.size()) << Lines(r.errors);
  RepairAndExpectClean();
  EXPECT_EQ(Check().used_blocks, 8u);
}

TEST_F(FsckTest, UnlinkedInodeOffTheOrphanListIsLeakedAndDeleted) {
  uint64_t f = File(kRootIno, "f");
  Extent(f, 0, 3, 50);
  // The entry goes, the inode stays with nlink 0 but no orphan mark.
  MetaBatch b;
  b.DeleteDirEntry(kRootIno, DirEntry{"f", f, S_IFREG, kFirstDirCookie});
  Commit(&b);
  Change(f, [](InodeRecord& r) { r.nlink = 0; });
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(f) +
                                    ": nlink 0 and no directory entry names it, but it is not on the orphan list "
                                    "(leaked, 3 blocks)"));
  RepairAndExpectClean();
  InodeRecord gone;
  EXPECT_EQ(meta_->GetInode(f, &gone).err(), ENOENT);
  EXPECT_EQ(Check().used_blocks, 0u);
}

TEST_F(FsckTest, OrphansAreNotesAndRepairFreesThem) {
  uint64_t f = File(kRootIno, "f");
  Extent(f, 0, 2, 40);
  UnlinkWhileOpen("f", f);
  Change(f, [](InodeRecord& r) { r.nlink = 0; });
  FsckReport r = Check();
  EXPECT_TRUE(r.errors.empty()) << Lines(r.errors);
  EXPECT_TRUE(r.clean());
  EXPECT_TRUE(HasLine(r.notes, "ino " + std::to_string(f) + ": unlinked while in use (orphan), 2 blocks"));

  FsckReport rep = Check(true);
  EXPECT_TRUE(HasLine(rep.repairs, "ino " + std::to_string(f) + ": freed the orphan"));
  InodeRecord gone;
  EXPECT_EQ(meta_->GetInode(f, &gone).err(), ENOENT);
  std::vector<uint64_t> orphans;
  ASSERT_TRUE(meta_->ListOrphans(&orphans).ok());
  EXPECT_TRUE(orphans.empty());
  EXPECT_TRUE(Check().notes.empty());
}

TEST_F(FsckTest, LinkedInodeOnTheOrphanListIsAnError) {
  uint64_t f = File(kRootIno, "f");
  MetaBatch b;
  b.PutOrphan(f);
  Commit(&b);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(f) +
                                    ": on the orphan list, but it is linked (1 directory entry): the next mount "
                                    "would delete it"));
  RepairAndExpectClean();
  EXPECT_EQ(Get(f).nlink, 1u);
}

TEST_F(FsckTest, DanglingEntryIsRemoved) {
  File(kRootIno, "keep");
  InodeRecord& root = recs_[kRootIno];
  MetaBatch b;
  b.PutDirEntry(kRootIno, DirEntry{"x", 44, S_IFREG, root.next_cookie++});
  b.PutInode(root);
  Commit(&b);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "dir 1 entry 'x': inode 44 does not exist"));
  RepairAndExpectClean();
  DirEntry e;
  EXPECT_EQ(meta_->Lookup(kRootIno, "x", &e).err(), ENOENT);
  EXPECT_TRUE(meta_->Lookup(kRootIno, "keep", &e).ok());
  EXPECT_EQ(Names(kRootIno), std::vector<std::string>{"keep"});
}

TEST_F(FsckTest, EntriesInAMissingDirectoryAreRemoved) {
  uint64_t f = File(kRootIno, "f");
  MetaBatch b;
  b.PutDirEntry(55, DirEntry{"y", f, S_IFREG, kFirstDirCookie});
  Commit(&b);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "dir 55 entry 'y': directory 55 does not exist"));
  RepairAndExpectClean();
}

TEST_F(FsckTest, WrongFileLinkCountIsFixed) {
  uint64_t f = File(kRootIno, "f");
  Link(f, kRootIno, "g");
  Change(f, [](InodeRecord& r) { r.nlink = 1; });
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(f) + ": nlink 1, but 2 directory entries name it"));
  RepairAndExpectClean();
  EXPECT_EQ(Get(f).nlink, 2u);
}

TEST_F(FsckTest, WrongDirectoryLinkCountAndParentAreFixed) {
  uint64_t a = Dir(kRootIno, "a");
  uint64_t b = Dir(a, "b");
  Dir(a, "c");
  Change(a, [](InodeRecord& r) { r.nlink = 2; });
  Change(b, [](InodeRecord& r) { r.parent = kRootIno; });
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "dir " + std::to_string(a) + ": nlink 2, but it has 2 subdirectories (expected 4)"));
  EXPECT_TRUE(HasLine(r.errors, "dir " + std::to_string(b) + ": parent (..) is 1, but its entry is in dir " +
                                    std::to_string(a)));
  RepairAndExpectClean();
  EXPECT_EQ(Get(a).nlink, 4u);
  EXPECT_EQ(Get(b).parent, a);
}

TEST_F(FsckTest, WrongTypeBitsInAnEntryAreFixed) {
  uint64_t f = File(kRootIno, "f");
  MetaBatch b;
  b.PutDirEntry(kRootIno, DirEntry{"f", f, S_IFDIR, kFirstDirCookie});
  Commit(&b);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "dir 1 entry 'f': type bits 040000, but inode " + std::to_string(f) +
                                    " has mode 0100644"));
  RepairAndExpectClean();
  DirEntry e;
  ASSERT_TRUE(meta_->Lookup(kRootIno, "f", &e).ok());
  EXPECT_EQ(e.mode, static_cast<uint32_t>(S_IFREG));
  EXPECT_EQ(e.cookie, kFirstDirCookie);
}

TEST_F(FsckTest, DirectoryHardLinkKeepsTheEntryDotDotAgreesWith) {
  uint64_t a = Dir(kRootIno, "a");
  uint64_t b = Dir(kRootIno, "b");
  MetaBatch mb;
  mb.PutDirEntry(b, DirEntry{"alias", a, S_IFDIR, recs_[b].next_cookie++});
  mb.PutInode(recs_[b]);
  Commit(&mb);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "dir " + std::to_string(b) + " entry 'alias': names directory " + std::to_string(a) +
                                    ", which also has entry 'a' in dir 1"));
  RepairAndExpectClean();
  DirEntry e;
  EXPECT_EQ(meta_->Lookup(b, "alias", &e).err(), ENOENT);
  EXPECT_TRUE(meta_->Lookup(kRootIno, "a", &e).ok());
}

TEST_F(FsckTest, UnreachableFileIsLinkedIntoLostAndFound) {
  uint64_t f = File(kRootIno, "f");
  Extent(f, 0, 4, 64);
  MetaBatch b;
  b.DeleteDirEntry(kRootIno, DirEntry{"f", f, S_IFREG, kFirstDirCookie});
  Commit(&b);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(f) + ": nlink 1, but no directory entry names it (unreachable)"));
  RepairAndExpectClean();
  DirEntry lf, e;
  ASSERT_TRUE(meta_->Lookup(kRootIno, "lost+found", &lf).ok());
  ASSERT_TRUE(meta_->Lookup(lf.ino, "#" + std::to_string(f), &e).ok());
  EXPECT_EQ(e.ino, f);
  EXPECT_EQ(Get(f).nlink, 1u);
  EXPECT_EQ(Get(kRootIno).nlink, 3u);
  EXPECT_EQ(Get(lf.ino).parent, kRootIno);
  EXPECT_GT(meta_->next_ino(), lf.ino);
  EXPECT_EQ(Check().used_blocks, 4u) << "the data stays";
}

TEST_F(FsckTest, UnreachableDirectoryBringsItsSubtreeBack) {
  uint64_t d = Dir(kRootIno, "d");
  uint64_t f = File(d, "f");
  MetaBatch b;
  b.DeleteDirEntry(kRootIno, DirEntry{"d", d, S_IFDIR, kFirstDirCookie});
  Commit(&b);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(d) + ": nlink 2, 1 entry, but no directory entry names it"));
  EXPECT_TRUE(HasLine(r.errors, "dir 1: nlink 3, but it has 0 subdirectories (expected 2)"));
  RepairAndExpectClean();
  DirEntry lf, e;
  ASSERT_TRUE(meta_->Lookup(kRootIno, "lost+found", &lf).ok());
  ASSERT_TRUE(meta_->Lookup(lf.ino, "#" + std::to_string(d), &e).ok());
  EXPECT_EQ(Get(d).parent, lf.ino);
  EXPECT_EQ(Get(lf.ino).nlink, 3u);
  ASSERT_TRUE(meta_->Lookup(d, "f", &e).ok());
  EXPECT_EQ(e.ino, f);
}

TEST_F(FsckTest, DirectoryCycleIsReportedAndNotRepaired) {
  uint64_t a = Dir(kRootIno, "a");
  uint64_t b = Dir(a, "b");
  // Detach a from the root and hang it below b: a -> b -> a.
  MetaBatch mb;
  mb.DeleteDirEntry(kRootIno, DirEntry{"a", a, S_IFDIR, kFirstDirCookie});
  mb.PutDirEntry(b, DirEntry{"a", a, S_IFDIR, kFirstDirCookie});
  Commit(&mb);
  Change(b, [](InodeRecord& r) { r.next_cookie = kFirstDirCookie + 1; r.nlink = 3; });
  Change(a, [b](InodeRecord& r) { r.parent = b; });
  Change(kRootIno, [](InodeRecord& r) { r.nlink = 2; });
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(a) + ": directory unreachable from the root"));
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(b) + ": directory unreachable from the root"));
  FsckReport rep = Check(true);
  EXPECT_FALSE(rep.clean());
}

TEST_F(FsckTest, ReaddirCookieRecordsAreRebuilt) {
  uint64_t f = File(kRootIno, "f");
  uint64_t g = File(kRootIno, "g");
  MetaBatch b;
  // f loses its cookie record; a cookie record names an entry that is gone.
  b.DeleteDirEntry(kRootIno, DirEntry{"no-such-name", 0, 0, kFirstDirCookie});
  b.PutDirEntry(kRootIno, DirEntry{"ghost", g, S_IFREG, 50});
  b.DeleteDirEntry(kRootIno, DirEntry{"ghost", 0, 0, 999});
  Commit(&b);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "dir 1 entry 'f': readdir cookie 3 has no index record"));
  EXPECT_TRUE(HasLine(r.errors, "dir 1: readdir cookie 50 names 'ghost', which has no entry with that cookie"));
  RepairAndExpectClean();
  std::vector<std::string> names;
  ASSERT_TRUE(meta_->ReadDir(kRootIno, 0, [&](const DirEntry& de) {
    names.push_back(de.name);
    return true;
  }).ok());
  EXPECT_EQ(names, (std::vector<std::string>{"f", "g"}));
  (void)f;
}

TEST_F(FsckTest, NextCookieAtOrBelowAnEntryIsRaised) {
  File(kRootIno, "f");
  Change(kRootIno, [](InodeRecord& r) { r.next_cookie = kFirstDirCookie; });
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "dir 1: next readdir cookie is 3, but an entry has cookie 3"));
  RepairAndExpectClean();
  EXPECT_EQ(Get(kRootIno).next_cookie, kFirstDirCookie + 1);
}

TEST_F(FsckTest, DuplicateCookieGetsAFreshOne) {
  uint64_t f = File(kRootIno, "f");
  MetaBatch b;
  b.PutDirEntry(kRootIno, DirEntry{"dup", f, S_IFREG, kFirstDirCookie});  // steals f's cookie record
  Commit(&b);
  Change(f, [](InodeRecord& r) { r.nlink = 2; });
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "dir 1 entry 'f': readdir cookie 3 is indexed as entry 'dup'"));
  RepairAndExpectClean();
  std::vector<std::pair<std::string, uint64_t>> got;
  ASSERT_TRUE(meta_->ReadDir(kRootIno, 0, [&](const DirEntry& de) {
    got.emplace_back(de.name, de.cookie);
    return true;
  }).ok());
  ASSERT_EQ(got.size(), 2u);
  EXPECT_NE(got[0].second, got[1].second);
  EXPECT_LT(std::max(got[0].second, got[1].second), Get(kRootIno).next_cookie);
}

TEST_F(FsckTest, InodeCounterBelowAnInodeIsRaised) {
  uint64_t f = File(kRootIno, "f");
  MetaBatch b;
  b.PutNextIno(f);
  Commit(&b);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "inode counter: next inode number is " + std::to_string(f) + ", but ino " +
                                    std::to_string(f) + " exists"));
  RepairAndExpectClean();
  EXPECT_EQ(meta_->next_ino(), f + 1);
}

TEST_F(FsckTest, MissingInodeCounterIsRecreated) {
  uint64_t f = File(kRootIno, "f");
  Raw("N", nullptr);
  std::unique_ptr<MetaStore> m;
  Status s = MetaStore::Open(dir_, kUuid, &m);
  EXPECT_FALSE(s.ok()) << "a store without its inode counter mounted";
  EXPECT_NE(s.message().find("deferfs fsck"), std::string::npos) << s.message();
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "inode counter: missing or corrupt"));
  EXPECT_EQ(r.repairable, 1u) << Lines(r.errors);
  RepairAndExpectClean();
  Reopen();  // as a mount opens it
  EXPECT_EQ(meta_->next_ino(), f + 1);
}

// Records too damaged to decode are reported one line each and deleted; the
// checks that follow see the store without them and repair the rest.
TEST_F(FsckTest, UndecodableRecordsAreDeleted) {
  uint64_t d = Dir(kRootIno, "d");
  uint64_t f = File(d, "f");        // its entry is damaged: f ends up in /lost+found
  uint64_t g = File(kRootIno, "g");  // its inode is damaged and it has no data: its entry goes
  uint64_t h = File(kRootIno, "h");  // one extent of two is damaged
  Extent(f, 0, 4, 100);
  Extent(h, 0, 1, 300);
  Extent(h, 8, 1, 301);
  Raw(RawKey('D', d, "f"), "short");
  Raw(RawKey('I', g), "xx");
  Raw(RawKey('E', h, Be64(8)), "bad extent");
  Reopen();  // as a mount: it fails on such a record when it reads it
  InodeRecord rec;
  EXPECT_FALSE(meta_->GetInode(g, &rec).ok());

  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "dir " + std::to_string(d) + " entry 'f': the record is corrupt (5 bytes, not 20)"));
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(g) + ": the inode record is corrupt (2 bytes, not 80)"));
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(h) + ": an extent record is corrupt (10 bytes, not 17)"));
  EXPECT_TRUE(HasLine(r.errors, "inode " + std::to_string(g) + " does not exist"));

  RepairAndExpectClean();
  EXPECT_FALSE(RawExists(RawKey('I', g)));
  EXPECT_FALSE(RawExists(RawKey('E', h, Be64(8))));
  Reopen();
  DirEntry e;
  EXPECT_FALSE(meta_->Lookup(d, "f", &e).ok());
  EXPECT_FALSE(meta_->Lookup(kRootIno, "g", &e).ok());
  DirEntry lf;
  ASSERT_TRUE(meta_->Lookup(kRootIno, "lost+found", &lf).ok());
  std::vector<uint64_t> reconnected;
  ASSERT_TRUE(meta_->ReadDir(lf.ino, 0, [&](const DirEntry& x) {
    reconnected.push_back(x.ino);
    return true;
  }).ok());
  EXPECT_EQ(reconnected, std::vector<uint64_t>{f}) << "the inode of the damaged entry was not reconnected";
  std::vector<uint64_t> lblks;
  ASSERT_TRUE(meta_->ForEachExtent(h, [&](const ExtentRecord& x) { lblks.push_back(x.lblk); }).ok());
  EXPECT_EQ(lblks, std::vector<uint64_t>{0});
}

// An unreadable inode with extents was a regular file: repair rebuilds it,
// under every name it had, and its blocks stay its own.
TEST_F(FsckTest, UndecodableInodeWithExtentsIsRebuiltWithItsData) {
  uint64_t d = Dir(kRootIno, "d");
  uint64_t f = File(kRootIno, "f");
  Link(f, d, "second-name");
  uint64_t lost = File(d, "lost");  // its entry is damaged too: it goes to /lost+found
  Extent(f, 0, 2, 100);
  Extent(f, 9, 1, 200, static_cast<uint8_t>(ExtentState::kUnwritten));
  Extent(lost, 0, 1, 300);
  MetaBatch b;
  b.PutXattr(f, "user.kept", "yes");
  Commit(&b);
  Raw(RawKey('I', f), "unreadable");
  Raw(RawKey('I', lost), "unreadable");
  Raw(RawKey('D', d, "lost"), "bad");

  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(f) + ": the inode record is corrupt (10 bytes, not 80)"));
  EXPECT_FALSE(HasLine(r.errors, "leaked")) << "its extents belong to the rebuilt file";
  EXPECT_FALSE(HasLine(r.errors, "does not exist")) << "its entries name the rebuilt file";
  EXPECT_EQ(r.used_blocks, 4u);
  EXPECT_TRUE(HasLine(r.notes, "ino " + std::to_string(f) +
                                   ": --repair rebuilds it from its 2 extents as a regular file of 40960 bytes"))
      << Lines(r.notes);
  EXPECT_EQ(r.inodes, 4u) << "the root, d, and the two rebuilt files";

  FsckReport fixed = Check(/*repair=*/true);
  EXPECT_TRUE(HasLine(fixed.repairs, "ino " + std::to_string(f) +
                                         ": rebuilt from its 2 extents as a regular file of 40960 bytes"));
  EXPECT_TRUE(fixed.clean()) << Lines(fixed.errors);
  EXPECT_TRUE(Check().errors.empty());
  Reopen();
  InodeRecord rec = Get(f);
  EXPECT_EQ(rec.mode, S_IFREG | 0600u);
  EXPECT_EQ(rec.uid, 0u);
  EXPECT_EQ(rec.size, 10u * 4096);
  EXPECT_EQ(rec.nlink, 2u);
  DirEntry e;
  ASSERT_TRUE(meta_->Lookup(kRootIno, "f", &e).ok());
  EXPECT_EQ(e.ino, f);
  ASSERT_TRUE(meta_->Lookup(d, "second-name", &e).ok());
  EXPECT_EQ(e.ino, f);
  std::vector<uint64_t> pblks;
  ASSERT_TRUE(meta_->ForEachExtent(f, [&](const ExtentRecord& x) { pblks.push_back(x.pblk); }).ok());
  EXPECT_EQ(pblks, (std::vector<uint64_t>{100, 200}));
  std::string v;
  EXPECT_TRUE(meta_->GetXattr(f, "user.kept", &v).ok());

  DirEntry lf;
  ASSERT_TRUE(meta_->Lookup(kRootIno, "lost+found", &lf).ok());
  ASSERT_TRUE(meta_->Lookup(lf.ino, "#" + std::to_string(lost), &e).ok());
  EXPECT_EQ(Get(lost).nlink, 1u);
  EXPECT_EQ(Get(lost).size, 4096u);
}

// Extents in doubt are not given a file: an unreadable inode whose extent
// overlaps another file's stays leaked records, which repair deletes (the
// overlap is then resolved), and one with a symlink target likewise.
TEST_F(FsckTest, UndecodableInodeWithDoubtfulRecordsIsNotRebuilt) {
  uint64_t keep = File(kRootIno, "keep");
  uint64_t bad = File(kRootIno, "bad");
  uint64_t link = Add(kRootIno, "link", S_IFLNK | 0777, "target");
  Extent(keep, 0, 4, 100);
  Extent(bad, 0, 2, 102);  // inside keep's blocks
  Extent(link, 0, 1, 300);
  Raw(RawKey('I', bad), "unreadable");
  Raw(RawKey('I', link), "unreadable");
  FsckReport fixed = Check(/*repair=*/true);
  EXPECT_FALSE(HasLine(fixed.repairs, "rebuilt")) << Lines(fixed.repairs);
  EXPECT_TRUE(fixed.clean()) << Lines(fixed.errors);
  EXPECT_TRUE(Check().errors.empty());
  EXPECT_FALSE(RawExists(RawKey('E', bad, Be64(0))));
  EXPECT_FALSE(RawExists(RawKey('E', link, Be64(0))));
  Reopen();
  EXPECT_EQ(Get(keep).nlink, 1u);
}

// An unreadable inode on the orphan list was unlinked while open: it is
// not rebuilt, and its blocks are freed, as the next mount would.
TEST_F(FsckTest, UndecodableOrphanIsFreed) {
  uint64_t f = File(kRootIno, "f");
  Extent(f, 0, 3, 100);
  UnlinkWhileOpen("f", f);
  Raw(RawKey('I', f), "unreadable");
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(f) +
                                    ": no inode record, but its records remain (leaked): 1 extent (3 blocks), "
                                    "an orphan record"));
  FsckReport fixed = Check(/*repair=*/true);
  EXPECT_TRUE(HasLine(fixed.repairs, "3 blocks freed"));
  EXPECT_FALSE(HasLine(fixed.repairs, "rebuilt"));
  EXPECT_TRUE(fixed.clean()) << Lines(fixed.errors);
  EXPECT_TRUE(Check().errors.empty());
  EXPECT_FALSE(RawExists(RawKey('I', f)));
  EXPECT_FALSE(RawExists(RawKey('E', f, Be64(0))));
}

// Keys of no record's shape: every scan skips them (a directory holding
// only a stray cookie key is empty), and fsck reports and deletes each.
TEST_F(FsckTest, MalformedKeysAreReportedAndDeleted) {
  uint64_t d = Dir(kRootIno, "d");
  uint64_t f = File(kRootIno, "f");
  const std::vector<std::pair<std::string, std::string>> keys = {
      {RawKey('I', f).substr(0, 5), "a 'I' key is 9 bytes, this one 5"},
      {RawKey('D', d), "a 'D' key is longer than 9 bytes, this one 9"},
      {RawKey('E', f, "abc"), "a 'E' key is 17 bytes, this one 12"},
      {RawKey('R', d, "xy"), "a 'R' key is 17 bytes, this one 11"},
      {RawKey('X', f), "a 'X' key is longer than 9 bytes, this one 9"},
      {"Zoo", "unknown prefix"},
  };
  for (const auto& [key, why] : keys) Raw(key, "whatever");
  Reopen();
  bool any = true;
  ASSERT_TRUE(meta_->HasEntries(d, &any).ok());
  EXPECT_FALSE(any) << "a stray cookie key made the directory non-empty";
  std::vector<std::string> xattrs;
  ASSERT_TRUE(meta_->ListXattrs(f, &xattrs).ok());
  EXPECT_TRUE(xattrs.empty());
  EXPECT_TRUE(Names(d).empty());

  FsckReport r = Check();
  for (const auto& [key, why] : keys) {
    EXPECT_TRUE(HasLine(r.errors, ": not a key this format writes (" + why + ")"));
  }
  EXPECT_TRUE(HasLine(r.errors, "key 5a6f6f: not a key this format writes"));
  EXPECT_EQ(r.errors.size(), keys.size()) << Lines(r.errors);
  RepairAndExpectClean();
  for (const auto& [key, why] : keys) EXPECT_FALSE(RawExists(key)) << why;
  Reopen();
  EXPECT_EQ(Get(f).ino, f);
  EXPECT_EQ(Names(kRootIno), (std::vector<std::string>{"d", "f"}));
}

// Without a root every entry of / reads as dangling and every inode under
// it as lost: repair must change nothing at all, not unlink the tree.
TEST_F(FsckTest, UndecodableRootInodeIsReportedAndNothingRepaired) {
  uint64_t f = File(kRootIno, "f");
  Raw(RawKey('I', kRootIno), "damaged");
  FsckReport r = Check(/*repair=*/true);
  EXPECT_TRUE(HasLine(r.errors, "ino 1: the inode record is corrupt (7 bytes, not 80)"));
  EXPECT_FALSE(HasLine(r.errors, "the root directory does not exist")) << "one line for one problem";
  EXPECT_TRUE(HasLine(r.notes, "nothing is repaired without a root directory"));
  EXPECT_TRUE(r.repairs.empty()) << Lines(r.repairs);
  EXPECT_EQ(r.repairable, 0u);
  EXPECT_EQ(r.remaining, r.errors.size());
  EXPECT_TRUE(RawExists(RawKey('I', kRootIno))) << "repair deleted the root";
  EXPECT_TRUE(RawExists(RawKey('D', kRootIno, "f"))) << "repair unlinked /f";
  Reopen();
  EXPECT_EQ(Get(f).nlink, 1u);
}

// Repair deletes a corrupt entry named lost+found and creates a new
// /lost+found under that very name, in one batch: the new one must win.
TEST_F(FsckTest, CorruptLostAndFoundEntryIsReplaced) {
  uint64_t lf = Dir(kRootIno, "lost+found");
  uint64_t kept = File(lf, "kept");
  Raw(RawKey('D', kRootIno, "lost+found"), "bad");
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "dir 1 entry 'lost+found': the record is corrupt"));
  RepairAndExpectClean();
  Reopen();
  DirEntry now;
  ASSERT_TRUE(meta_->Lookup(kRootIno, "lost+found", &now).ok());
  EXPECT_NE(now.ino, lf) << "the old directory is unreachable: it goes into a new lost+found";
  EXPECT_EQ(Names(kRootIno), std::vector<std::string>{"lost+found"});
  DirEntry old;
  ASSERT_TRUE(meta_->Lookup(now.ino, "#" + std::to_string(lf), &old).ok());
  EXPECT_TRUE(meta_->Lookup(lf, "kept", &old).ok());
  EXPECT_EQ(old.ino, kept);
}

// A new counter starts past every inode number the store has records of,
// those of a corrupt inode included, so /lost+found (made in the same
// repair) does not take the number of an inode being deleted.
TEST_F(FsckTest, RecreatedInodeCounterPassesCorruptAndLeakedInodes) {
  uint64_t d = Dir(kRootIno, "d");
  uint64_t child = File(d, "child");  // unreachable once d goes: needs /lost+found
  uint64_t last = File(kRootIno, "last");
  Extent(last, 0, 4, 500);
  Raw(RawKey('I', d), "x");
  Raw(RawKey('I', last), "x");
  Raw("N", nullptr);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "inode counter: missing or corrupt"));
  RepairAndExpectClean();
  Reopen();
  EXPECT_GT(meta_->next_ino(), last + 1) << "lost+found took a number past the deleted ones";
  DirEntry lf;
  ASSERT_TRUE(meta_->Lookup(kRootIno, "lost+found", &lf).ok());
  EXPECT_GT(lf.ino, last);
  DirEntry e;
  ASSERT_TRUE(meta_->Lookup(lf.ino, "#" + std::to_string(child), &e).ok());
}

TEST_F(FsckTest, SymlinkProblems) {
  uint64_t l = Add(kRootIno, "l", S_IFLNK | 0777, "target");
  Change(l, [](InodeRecord& r) { r.size = 3; });
  uint64_t m = Add(kRootIno, "m", S_IFLNK | 0777, "t");
  MetaBatch b;
  meta_->DeleteInode(m, &b);  // takes the target with it
  b.PutInode(recs_[m]);
  Commit(&b);
  FsckReport r = Check();
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(l) + ": symlink size 3, but its target has 6 bytes"));
  EXPECT_TRUE(HasLine(r.errors, "ino " + std::to_string(m) + ": symlink without a target"));
  FsckReport rep = Check(true);
  EXPECT_EQ(rep.remaining, 1u) << Lines(rep.errors);
  EXPECT_EQ(Get(l).size, 6u);
  EXPECT_TRUE(HasLine(Check().errors, "symlink without a target"));
}

TEST_F(FsckTest, TruncatedDeviceIsReported) {
  Reopen();
  FsckReport r;
  ASSERT_TRUE(Fsck(sb_, kDeviceBytes - 4096, meta_.get(), FsckOptions{}, &r).ok());
  EXPECT_TRUE(HasLine(r.errors, "superblock: the filesystem is 67108864 bytes, but the device has only 67104768"));
  EXPECT_FALSE(r.clean());
}

TEST_F(FsckTest, ProgressReportsPhases) {
  Reopen();
  std::vector<std::string> phases;
  FsckOptions opt;
  opt.progress = [&](const std::string& p) { phases.push_back(p); };
  FsckReport r;
  ASSERT_TRUE(Fsck(sb_, kDeviceBytes, meta_.get(), opt, &r).ok());
  EXPECT_GE(phases.size(), 4u);
}

}  // namespace
}  // namespace deferfs
