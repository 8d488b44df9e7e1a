// DataBarrier and the ordered metadata store: no WAL byte reaches the OS
// before the device flush that its commits are owed, and no flush is run
// that nothing asked for.
#include "backend/data_barrier.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "backend/metadata.h"
#include "tests/unit/temp_dir.h"

namespace deferfs {
namespace {

constexpr Uuid kUuid = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

// Bytes in the store's WAL files, as the OS sees them.
uint64_t WalBytes(const std::string& dir) {
  uint64_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().extension() == ".log") n += e.file_size();
  }
  return n;
}

class OrderedStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(tmp_.path().empty());
    dir_ = tmp_.Sub("meta");
    ASSERT_TRUE(MetaStore::Create(dir_, kUuid, 0, 0).ok());
    ASSERT_TRUE(MetaStore::Open(dir_, kUuid, &store_).ok());
    store_->barrier().SetFlush([this] {
      wal_at_flush_.push_back(WalBytes(dir_));
      return flush_result_;
    });
    wal_start_ = WalBytes(dir_);
  }

  // The store's last SyncWal() still calls the flush, which uses members.
  void TearDown() override { store_.reset(); }

  // A commit such as a write's end_io makes: an extent of inode 7.
  Status CommitExtent(uint64_t lblk, bool data_durable = false) {
    MetaBatch b;
    b.PutExtent(7, ExtentRecord{lblk, 1, 1000 + lblk, 1});
    if (data_durable) b.set_data_durable();
    return store_->Commit(&b);
  }

  TempDir tmp_;
  std::string dir_;
  std::unique_ptr<MetaStore> store_;
  std::vector<uint64_t> wal_at_flush_;
  Status flush_result_ = Status::Ok();
  uint64_t wal_start_ = 0;
};

TEST_F(OrderedStoreTest, CommitsStayOffTheWalFileUntilASyncPoint) {
  ASSERT_TRUE(CommitExtent(0).ok());
  ASSERT_TRUE(CommitExtent(1).ok());
  EXPECT_EQ(WalBytes(dir_), wal_start_) << "a commit reached the OS before any sync point";
  EXPECT_TRUE(wal_at_flush_.empty());
  int seen = 0;
  ASSERT_TRUE(store_->ForEachExtent(7, [&](const ExtentRecord&) { seen++; }).ok());
  EXPECT_EQ(seen, 2) << "commits must be visible at once, durable or not";
}

// A commit runs on a FUSE worker (a deferred completion): if the WAL buffer
// filled between sync points, that worker would write the WAL out and flush
// the device (milliseconds) in the middle of a request. Seconds of commits at
// full speed must fit: 40k extent commits are well over 2 MiB of WAL.
TEST_F(OrderedStoreTest, ManyCommitsBetweenSyncPointsNeverFlush) {
  for (uint64_t i = 0; i < 40000; i++) ASSERT_TRUE(CommitExtent(i).ok());
  EXPECT_EQ(WalBytes(dir_), wal_start_) << "the WAL buffer spilled to the file between sync points";
  EXPECT_TRUE(wal_at_flush_.empty()) << "a commit flushed the device";
  ASSERT_TRUE(store_->SyncWal().ok());
  EXPECT_EQ(wal_at_flush_.size(), 1u);
  EXPECT_GT(WalBytes(dir_), wal_start_ + (2u << 20));
}

TEST_F(OrderedStoreTest, TheDeviceIsFlushedBeforeTheWalIsWritten) {
  ASSERT_TRUE(CommitExtent(0).ok());
  ASSERT_TRUE(store_->SyncWal().ok());
  ASSERT_EQ(wal_at_flush_.size(), 1u) << "one flush for the owed commits";
  EXPECT_EQ(wal_at_flush_[0], wal_start_) << "the WAL grew before the device flush";
  EXPECT_GT(WalBytes(dir_), wal_start_) << "SyncWal must write the WAL out";
  EXPECT_EQ(store_->barrier().flushes(), 1u);
}

TEST_F(OrderedStoreTest, NothingOwedMeansNoFlush) {
  ASSERT_TRUE(store_->SyncWal().ok());  // nothing committed
  ASSERT_TRUE(CommitExtent(0, /*data_durable=*/true).ok());
  ASSERT_TRUE(store_->SyncWal().ok());
  EXPECT_TRUE(wal_at_flush_.empty()) << "FUA data owes no flush";
  EXPECT_GT(WalBytes(dir_), wal_start_);
  const uint64_t synced = WalBytes(dir_);
  ASSERT_TRUE(store_->SyncWal().ok());  // again, with nothing new
  EXPECT_EQ(WalBytes(dir_), synced);
  EXPECT_TRUE(wal_at_flush_.empty());
}

TEST_F(OrderedStoreTest, AFailedFlushKeepsTheRecordsOffDiskAndStaysOwed) {
  ASSERT_TRUE(CommitExtent(0).ok());
  flush_result_ = Status::IoError("injected flush failure");
  EXPECT_FALSE(store_->SyncWal().ok());
  EXPECT_EQ(WalBytes(dir_), wal_start_) << "records written behind a failed flush";
  // The barrier stays armed: the next Pass() must flush again.
  flush_result_ = Status::Ok();
  const size_t before = wal_at_flush_.size();
  EXPECT_TRUE(store_->barrier().Pass().ok());
  EXPECT_EQ(wal_at_flush_.size(), before + 1);
}

TEST(DataBarrierTest, PassFlushesOnlyWhenArmed) {
  DataBarrier b;
  int flushes = 0;
  b.SetFlush([&] { return flushes++, Status::Ok(); });
  EXPECT_TRUE(b.Pass().ok());
  EXPECT_EQ(flushes, 0);
  b.Arm();
  b.Arm();
  EXPECT_TRUE(b.Pass().ok());
  EXPECT_EQ(flushes, 1);
  EXPECT_TRUE(b.Pass().ok());
  EXPECT_EQ(flushes, 1);
  EXPECT_TRUE(b.Flush().ok());
  EXPECT_EQ(flushes, 2);
}

}  // namespace
}  // namespace deferfs
