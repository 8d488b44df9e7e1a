// `deferfs fsck` as a user runs it: on a real mkfs'd backing file after real
// use through a FUSE mount it is clean; it refuses while the filesystem is
// mounted; corruption written into the store offline is found (non-zero
// exit, the precise line), --repair fixes it, the next fsck is clean and the
// filesystem mounts with its data intact. An overlap is never "repaired".
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include "backend/metadata.h"
#include "backend/superblock.h"
#include "tests/mount/mounted_fs.h"

namespace deferfs_test {
namespace {

using deferfs::DirEntry;
using deferfs::ExtentRecord;
using deferfs::InodeRecord;
using deferfs::MetaBatch;
using deferfs::MetaStore;

// The filesystem's store, opened offline the way fsck does (by the UUID in
// the backing file's superblock). The backing must not be mounted.
std::unique_ptr<MetaStore> OpenStore(const MountedFs& fs) {
  std::vector<uint8_t> buf(deferfs::kSuperblockBytes);
  UniqueFd fd(open(fs.backing().c_str(), O_RDONLY | O_CLOEXEC));
  EXPECT_TRUE(fd.ok()) << fs.backing() << ": " << strerror(errno);
  if (!fd.ok() || pread(fd.get(), buf.data(), buf.size(), 0) != static_cast<ssize_t>(buf.size())) return nullptr;
  deferfs::Superblock sb;
  deferfs::Status s = deferfs::DecodeSuperblock(buf.data(), fs.backing(), &sb);
  EXPECT_TRUE(s.ok()) << s.message();
  std::unique_ptr<MetaStore> meta;
  if (s.ok()) s = MetaStore::Open(fs.meta(), sb.uuid, &meta);
  EXPECT_TRUE(s.ok()) << s.message();
  return meta;
}

bool WriteFile(const std::string& path, const std::string& data) {
  UniqueFd fd(open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  return fd.ok() && write(fd.get(), data.data(), data.size()) == static_cast<ssize_t>(data.size());
}

std::string ReadFile(const std::string& path) {
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  std::string s(1 << 20, '\0');
  ssize_t n = fd.ok() ? read(fd.get(), s.data(), s.size()) : -1;
  s.resize(n > 0 ? static_cast<size_t>(n) : 0);
  return s;
}

::testing::AssertionResult Mentions(const std::string& out, const std::string& text) {
  if (out.find(text) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "output lacks \"" << text << "\":\n" << out;
}

class FsckMountTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (getenv("DEFERFS_TEST_DIR") != nullptr && *getenv("DEFERFS_TEST_DIR") != '\0') {
      GTEST_SKIP() << "fsck needs a real deferfs";
    }
  }

  // A tree with every kind of inode and some data, then unmounted.
  void Populate(MountedFs& fs) {
    ASSERT_EQ(mkdir(fs.path("d").c_str(), 0755), 0);
    ASSERT_EQ(mkdir(fs.path("d/sub").c_str(), 0755), 0);
    ASSERT_TRUE(WriteFile(fs.path("d/f"), std::string(300000, 'x')));
    ASSERT_TRUE(WriteFile(fs.path("small"), "hello"));
    ASSERT_TRUE(WriteFile(fs.path("gone"), std::string(8192, 'g')));
    ASSERT_EQ(link(fs.path("d/f").c_str(), fs.path("d/sub/hard").c_str()), 0);
    ASSERT_EQ(symlink("d/f", fs.path("ln").c_str()), 0);
    ASSERT_EQ(rename(fs.path("small").c_str(), fs.path("d/sub/moved").c_str()), 0);
    ASSERT_EQ(unlink(fs.path("gone").c_str()), 0);
    ASSERT_EQ(mkdir(fs.path("tmpdir").c_str(), 0755), 0);
    ASSERT_EQ(rmdir(fs.path("tmpdir").c_str()), 0);
  }

  // Unmounted, fsck finds nothing, not even an orphan for the next mount.
  void UnmountCleanWithoutOrphans(MountedFs& fs) {
    ASSERT_TRUE(fs.Unmount());
    RunResult r = Fsck(fs);
    EXPECT_TRUE(r.succeeded()) << r.Describe();
    EXPECT_TRUE(Mentions(r.out, "is clean"));
    EXPECT_FALSE(Mentions(r.out, "orphan")) << r.Describe();
  }

  RunResult Fsck(const MountedFs& fs, bool repair = false) {
    std::vector<std::string> args{"fsck", fs.backing()};
    if (repair) args.push_back("--repair");
    return RunDeferfs(args);
  }
};

TEST_F(FsckMountTest, CleanAfterUseRefusesWhileMountedFindsAndRepairsCorruption) {
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  Populate(fs);

  RunResult busy = Fsck(fs);
  EXPECT_EQ(busy.exit_code(), 1) << busy.Describe();
  EXPECT_TRUE(Mentions(busy.err, "is mounted at " + fs.root())) << busy.Describe();

  ASSERT_TRUE(fs.Unmount());
  RunResult clean = Fsck(fs);
  EXPECT_TRUE(clean.succeeded()) << clean.Describe();
  EXPECT_TRUE(Mentions(clean.out, "is clean"));
  EXPECT_TRUE(clean.err.empty()) << clean.Describe();

  // Corrupt it offline: a dangling entry, a wrong link count, leaked blocks
  // of an inode that does not exist.
  uint64_t f_ino = 0;
  {
    std::unique_ptr<MetaStore> meta = OpenStore(fs);
    ASSERT_TRUE(meta);
    DirEntry d, f;
    ASSERT_TRUE(meta->Lookup(deferfs::kRootIno, "d", &d).ok());
    ASSERT_TRUE(meta->Lookup(d.ino, "f", &f).ok());
    f_ino = f.ino;
    InodeRecord root, rec;
    ASSERT_TRUE(meta->GetInode(deferfs::kRootIno, &root).ok());
    ASSERT_TRUE(meta->GetInode(f.ino, &rec).ok());
    ASSERT_EQ(rec.nlink, 2u);
    rec.nlink = 1;
    MetaBatch b;
    b.PutInode(rec);
    b.PutDirEntry(deferfs::kRootIno, DirEntry{"ghost", 9999, S_IFREG, root.next_cookie++});
    b.PutInode(root);
    b.PutExtent(5000, ExtentRecord{0, 16, 60000, 0});
    ASSERT_TRUE(meta->Commit(&b, true).ok());
  }

  RunResult bad = Fsck(fs);
  EXPECT_EQ(bad.exit_code(), 1) << bad.Describe();
  EXPECT_TRUE(Mentions(bad.out, "error: dir 1 entry 'ghost': inode 9999 does not exist"));
  EXPECT_TRUE(Mentions(bad.out, "error: ino " + std::to_string(f_ino) + ": nlink 1, but 2 directory entries name it"));
  EXPECT_TRUE(Mentions(bad.out, "error: ino 5000: no inode record, but its records remain (leaked): 1 extent (16 blocks)"));
  EXPECT_TRUE(Mentions(bad.err, "deferfs: ")) << bad.Describe();
  EXPECT_TRUE(Mentions(bad.err, "--repair")) << bad.Describe();

  RunResult fixed = Fsck(fs, /*repair=*/true);
  EXPECT_TRUE(fixed.succeeded()) << fixed.Describe();
  EXPECT_TRUE(Mentions(fixed.out, "repaired: dir 1 entry 'ghost': removed"));
  EXPECT_TRUE(Mentions(fixed.out, "repaired: ino " + std::to_string(f_ino) + ": nlink set to 2"));
  EXPECT_TRUE(Mentions(fixed.out, "repaired: ino 5000: deleted the leaked records, 16 blocks freed"));

  RunResult again = Fsck(fs);
  EXPECT_TRUE(again.succeeded()) << again.Describe();
  EXPECT_TRUE(Mentions(again.out, "is clean"));

  // The repaired filesystem mounts with its data and links as they were.
  ASSERT_TRUE(fs.Mount());
  EXPECT_EQ(ReadFile(fs.path("d/sub/hard")), std::string(300000, 'x'));
  EXPECT_EQ(ReadFile(fs.path("d/sub/moved")), "hello");
  struct stat st {};
  ASSERT_EQ(stat(fs.path("d/f").c_str(), &st), 0);
  EXPECT_EQ(st.st_nlink, 2u);
  EXPECT_NE(lstat(fs.path("ghost").c_str(), &st), 0);
  ASSERT_TRUE(fs.Unmount());
}

TEST_F(FsckMountTest, OverlappingExtentsFailEvenWithRepair) {
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  ASSERT_TRUE(WriteFile(fs.path("a"), std::string(65536, 'a')));
  ASSERT_TRUE(WriteFile(fs.path("b"), std::string(4096, 'b')));
  ASSERT_TRUE(fs.Unmount());

  uint64_t a_ino = 0, b_ino = 0;
  {
    std::unique_ptr<MetaStore> meta = OpenStore(fs);
    ASSERT_TRUE(meta);
    DirEntry a, b;
    ASSERT_TRUE(meta->Lookup(deferfs::kRootIno, "a", &a).ok());
    ASSERT_TRUE(meta->Lookup(deferfs::kRootIno, "b", &b).ok());
    a_ino = a.ino;
    b_ino = b.ino;
    ExtentRecord first{};
    bool found = false;
    ASSERT_TRUE(meta->ForEachExtent(a.ino, [&](const ExtentRecord& e) {
      if (!found) first = e;
      found = true;
    }).ok());
    ASSERT_TRUE(found);
    // b's block 100 now claims a's first physical block.
    MetaBatch batch;
    batch.PutExtent(b.ino, ExtentRecord{100, 1, first.pblk, 0});
    ASSERT_TRUE(meta->Commit(&batch, true).ok());
  }
  const std::string overlap = "error: ino " + std::to_string(b_ino) + ": extent lblk 100 len 1 pblk ";
  for (bool repair : {false, true}) {
    RunResult r = Fsck(fs, repair);
    EXPECT_EQ(r.exit_code(), 1) << r.Describe();
    EXPECT_TRUE(Mentions(r.out, overlap));
    EXPECT_TRUE(Mentions(r.out, "overlaps ino " + std::to_string(a_ino) + " extent lblk 0"));
    EXPECT_TRUE(Mentions(r.err, "found 1 error that --repair cannot fix")) << r.Describe();
  }
}

// A mount refuses a store without its inode counter and says to run fsck;
// fsck must then be able to find it and repair it, not refuse the same way.
TEST_F(FsckMountTest, MissingInodeCounterIsRepaired) {
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  ASSERT_TRUE(WriteFile(fs.path("a"), "kept"));
  ASSERT_TRUE(fs.Unmount());
  {
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(), fs.meta(), &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    rocksdb::WriteOptions wo;
    wo.sync = true;
    ASSERT_TRUE(db->Delete(wo, "N").ok());  // the counter's key, as the store's format spells it
  }

  RunResult refused = RunDeferfs({"mount", fs.backing(), fs.root()});
  if (refused.succeeded()) RunCommand({"fusermount3", "-u", fs.root()});
  EXPECT_EQ(refused.exit_code(), 1) << refused.Describe();
  EXPECT_TRUE(Mentions(refused.err, "run 'deferfs fsck'"));

  RunResult bad = Fsck(fs);
  EXPECT_EQ(bad.exit_code(), 1) << bad.Describe();
  EXPECT_TRUE(Mentions(bad.out, "error: inode counter: missing or corrupt"));
  EXPECT_TRUE(Mentions(bad.err, "--repair")) << bad.Describe();
  RunResult fixed = Fsck(fs, /*repair=*/true);
  EXPECT_TRUE(fixed.succeeded()) << fixed.Describe();
  EXPECT_TRUE(Mentions(fixed.out, "repaired: inode counter: set to"));

  ASSERT_TRUE(fs.Mount());
  EXPECT_EQ(ReadFile(fs.path("a")), "kept");
  ASSERT_TRUE(WriteFile(fs.path("b"), "new"));
  struct stat a {}, b {};
  ASSERT_EQ(stat(fs.path("a").c_str(), &a), 0);
  ASSERT_EQ(stat(fs.path("b").c_str(), &b), 0);
  EXPECT_NE(a.st_ino, b.st_ino) << "a create reused an inode number";
  ASSERT_TRUE(fs.Unmount());
}

// A file whose inode record is unreadable keeps its data: the mount refuses
// to read it, fsck --repair rebuilds it from its extents, and the bytes
// written through the mount read back under its name.
TEST_F(FsckMountTest, FileWithAnUnreadableInodeKeepsItsData) {
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  std::string data(3 * 4096, '\0');
  for (size_t i = 0; i < data.size(); i++) data[i] = static_cast<char>('a' + i % 26);
  ASSERT_TRUE(WriteFile(fs.path("precious"), data));
  ASSERT_TRUE(fs.Unmount());
  uint64_t ino = 0;
  {
    std::unique_ptr<MetaStore> meta = OpenStore(fs);
    ASSERT_TRUE(meta);
    DirEntry e;
    ASSERT_TRUE(meta->Lookup(deferfs::kRootIno, "precious", &e).ok());
    ino = e.ino;
  }
  {
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(), fs.meta(), &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    std::string key(1, 'I');  // the inode's key, as the store's format spells it
    for (int i = 7; i >= 0; i--) key.push_back(static_cast<char>(ino >> (i * 8)));
    rocksdb::WriteOptions wo;
    wo.sync = true;
    ASSERT_TRUE(db->Put(wo, key, "damaged").ok());
  }

  RunResult bad = Fsck(fs);
  EXPECT_EQ(bad.exit_code(), 1) << bad.Describe();
  EXPECT_TRUE(Mentions(bad.out, "ino " + std::to_string(ino) + ": the inode record is corrupt"));
  RunResult fixed = Fsck(fs, /*repair=*/true);
  EXPECT_TRUE(fixed.succeeded()) << fixed.Describe();
  EXPECT_TRUE(Mentions(fixed.out, "rebuilt from its"));
  EXPECT_TRUE(Fsck(fs).succeeded());

  ASSERT_TRUE(fs.Mount());
  struct stat st {};
  ASSERT_EQ(stat(fs.path("precious").c_str(), &st), 0);
  EXPECT_EQ(st.st_ino, ino);
  EXPECT_EQ(st.st_mode, S_IFREG | 0600u);
  EXPECT_EQ(ReadFile(fs.path("precious")), data);
  ASSERT_TRUE(fs.Unmount());
}

// The kernel may open an unlinked file while it still knows the inode: a
// descriptor opened with O_PATH reopens it through /proc/self/fd, as on
// ext4. Its blocks stay its own until the kernel lets go; then the inode is
// deleted and the blocks come back, and no fsck finds a leftover.
TEST_F(FsckMountTest, UnlinkedFileStaysUntilTheKernelLetsGo) {
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  const std::string victim = fs.path("victim");
  auto free_blocks = [&] {  // counting blocks freed but not yet reusable
    struct statvfs v {};
    EXPECT_EQ(statvfs(fs.root().c_str(), &v), 0) << strerror(errno);
    return v.f_bfree;
  };
  const auto empty = free_blocks();
  ASSERT_TRUE(WriteFile(victim, std::string(8192, 'V')));
  const auto with_victim = free_blocks();
  ASSERT_EQ(empty - with_victim, 2u);

  UniqueFd path(open(victim.c_str(), O_PATH | O_CLOEXEC));
  ASSERT_TRUE(path.ok()) << strerror(errno);
  ASSERT_EQ(unlink(victim.c_str()), 0) << strerror(errno);
  EXPECT_EQ(free_blocks(), with_victim) << "the unlinked file's blocks were freed while the kernel still knows it";
  ASSERT_TRUE(WriteFile(fs.path("other"), std::string(8192, 'O')));  // would take freed blocks

  const std::string proc = "/proc/self/fd/" + std::to_string(path.get());
  UniqueFd fd(open(proc.c_str(), O_RDWR | O_CLOEXEC));
  ASSERT_TRUE(fd.ok()) << "reopening the unlinked file: " << strerror(errno);
  std::string got(8192, '\0');
  ASSERT_EQ(pread(fd.get(), got.data(), got.size(), 0), 8192) << strerror(errno);
  EXPECT_EQ(got, std::string(8192, 'V'));
  const std::string tail(4096, 'T');
  ASSERT_EQ(pwrite(fd.get(), tail.data(), tail.size(), 8192), 4096) << strerror(errno);  // extends it
  fd = UniqueFd();
  path = UniqueFd();
  EXPECT_EQ(ReadFile(fs.path("other")), std::string(8192, 'O')) << "another file's data changed";
  // Only "other" is left: the victim's three blocks (two and the tail) are back.
  EXPECT_TRUE(WaitUntil([&] { return free_blocks() == empty - 2; }))
      << "the blocks did not come back after the kernel let go: " << free_blocks() << " free, want " << empty - 2;

  ASSERT_NO_FATAL_FAILURE(UnmountCleanWithoutOrphans(fs));
}

// The same race from two shells: `echo >> f` and `rm -f f` in loops. The
// append's open can reach the inode after the unlink took its last name.
TEST_F(FsckMountTest, AppendsRacingUnlinksLeaveNothingBehind) {
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  const std::string f = fs.path("f");
  std::atomic<bool> stop{false};
  std::thread remover([&] {
    while (!stop.load()) unlink(f.c_str());
  });
  int appends = 0;
  for (auto end = std::chrono::steady_clock::now() + std::chrono::seconds(2); std::chrono::steady_clock::now() < end;) {
    UniqueFd fd(open(f.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644));
    if (!fd.ok()) {
      ADD_FAILURE() << "open with O_CREAT failed: " << strerror(errno);
      break;
    }
    if (write(fd.get(), "data\n", 5) == 5) appends++;
  }
  stop = true;
  remover.join();
  ASSERT_GT(appends, 100);
  ASSERT_NO_FATAL_FAILURE(UnmountCleanWithoutOrphans(fs));
}

// At unmount the kernel lets go of every inode without a forget: an unlinked
// file it still held (here through a lazy unmount) is deleted by the daemon
// on its way out, not left as an orphan.
TEST_F(FsckMountTest, UnlinkedFileHeldAtUnmountIsDeletedThen) {
  MountedFs fs;
  ASSERT_TRUE(fs.ok());
  ASSERT_TRUE(WriteFile(fs.path("held"), std::string(8192, 'H')));
  UniqueFd path(open(fs.path("held").c_str(), O_PATH | O_CLOEXEC));
  ASSERT_TRUE(path.ok()) << strerror(errno);
  ASSERT_EQ(unlink(fs.path("held").c_str()), 0) << strerror(errno);
  ASSERT_EQ(umount2(fs.root().c_str(), MNT_DETACH), 0) << strerror(errno);
  path = UniqueFd();  // the last reference: the connection ends, the daemon exits
  ASSERT_NO_FATAL_FAILURE(UnmountCleanWithoutOrphans(fs));
}

TEST_F(FsckMountTest, UsageErrorsAreOneLine) {
  RunResult missing = RunDeferfs({"fsck", "/nonexistent/deferfs-fsck.img"});
  EXPECT_EQ(missing.exit_code(), 1) << missing.Describe();
  EXPECT_EQ(missing.err.rfind("deferfs: ", 0), 0u) << missing.Describe();
  RunResult help = RunDeferfs({"fsck", "--help"});
  EXPECT_TRUE(help.succeeded()) << help.Describe();
  EXPECT_TRUE(Mentions(help.out, "--repair"));
  EXPECT_TRUE(Mentions(help.out, "--meta"));
}

}  // namespace
}  // namespace deferfs_test
