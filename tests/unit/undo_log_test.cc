// UndoLog and RollBackUnflushedWrites against a real O_DIRECT file: writes
// through the Device and through a Poller, flushes, FUA, a torn log.
#include "backend/undo_log.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include <rocksdb/file_system.h>

#include "backend/data_barrier.h"
#include "backend/device.h"
#include "backend/poller.h"
#include "tests/unit/temp_dir.h"

namespace deferfs {
namespace {

constexpr uint32_t kBlock = 4096;
constexpr uint64_t kBlocks = 16;
constexpr char kPrefill = 'z';

off_t SizeOf(const std::string& path) {
  struct stat st{};
  return ::stat(path.c_str(), &st) == 0 ? st.st_size : -1;
}

class UndoLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    backing_ = dir_.Sub("backing");
    log_ = dir_.Sub("undo.log");
    {
      UniqueFd fd(::open(backing_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
      ASSERT_TRUE(fd.valid()) << std::strerror(errno);
      std::vector<char> fill(kBlocks * kBlock, kPrefill);
      ASSERT_EQ(::pwrite(fd.get(), fill.data(), fill.size(), 0), static_cast<ssize_t>(fill.size()));
      ASSERT_EQ(::fsync(fd.get()), 0);
    }
    Status s = Device::Open(backing_, &dev_);
    ASSERT_TRUE(s.ok()) << s.ToString();
    s = dev_->KeepUndoLog(log_);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  void Write(uint64_t block, char fill) {
    AlignedBuffer buf(kBlock, dev_->dio_align());
    std::memset(buf.data(), fill, kBlock);
    Status s = dev_->WriteSync(block * kBlock, buf.data(), kBlock);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  void Flush() {
    Status s = dev_->FlushSync();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  // A write the test drives itself: logged, written, and (if `complete`)
  // reported complete. Returns its seq.
  uint64_t LoggedWrite(uint64_t block, char fill, bool complete = true, bool fua = false) {
    uint64_t seq = 0;
    Status s = dev_->undo_log()->BeforeWrite(block * kBlock, kBlock, &seq);
    EXPECT_TRUE(s.ok()) << s.ToString();
    std::vector<char> buf(kBlock, fill);
    UniqueFd fd(::open(backing_.c_str(), O_WRONLY | O_CLOEXEC));
    EXPECT_EQ(::pwrite(fd.get(), buf.data(), kBlock, static_cast<off_t>(block * kBlock)), kBlock);
    EXPECT_EQ(::fdatasync(fd.get()), 0);  // so the log's O_DIRECT reads see it
    if (complete) dev_->undo_log()->Completed(seq, fua);
    return seq;
  }

  // Ends the "mount" (the device closes, as a killed daemon's would) and
  // rolls back.
  RolledBack PowerCut(UnsyncedFiles files = UnsyncedFiles::kLost) {
    dev_.reset();
    RolledBack r;
    Status s = RollBackUnflushedWrites(log_, backing_, files, &r);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return r;
  }

  // The first byte of each block (every block is one byte repeated).
  std::string Blocks() {
    UniqueFd fd(::open(backing_.c_str(), O_RDONLY | O_CLOEXEC));
    std::string out;
    for (uint64_t b = 0; b < kBlocks; b++) {
      std::vector<char> buf(kBlock);
      EXPECT_EQ(::pread(fd.get(), buf.data(), kBlock, b * kBlock), kBlock);
      for (char c : buf) {
        if (c != buf[0]) {
          ADD_FAILURE() << "block " << b << " is mixed";
          break;
        }
      }
      out += buf[0];
    }
    return out;
  }

  TempDir dir_;
  std::string backing_, log_;
  std::unique_ptr<Device> dev_;
};

TEST_F(UndoLogTest, EachBlockGoesBackToWhatItHeldAtTheLastFlush) {
  Write(3, 'f');
  Write(0, 'a');
  Flush();  // covers every write before it, not only the last
  Write(0, 'b');  // unflushed: back to 'a'
  Write(1, 'c');  // never flushed: back to the prefill
  Write(2, 'd');
  Write(2, 'e');  // two unflushed writes: back to before the first
  ASSERT_EQ(Blocks(), "bcefzzzzzzzzzzzz");
  EXPECT_EQ(PowerCut().device_bytes, 3u * kBlock);
  EXPECT_EQ(Blocks(), "azzfzzzzzzzzzzzz");
}

TEST_F(UndoLogTest, NothingToRollBackAfterAFinalFlush) {
  Write(0, 'a');
  Write(5, 'b');
  Flush();
  EXPECT_EQ(PowerCut().device_bytes, 0u);
  EXPECT_EQ(Blocks(), "azzzzbzzzzzzzzzz");
}

// Poller writes are logged too, and a completed FUA write is durable alone.
TEST_F(UndoLogTest, PollerWritesAreLoggedAndFuaIsDurable) {
  std::unique_ptr<Poller> poller;
  Status s = Poller::Create(*dev_, PollerOptions{}, &poller);
  ASSERT_TRUE(s.ok()) << s.ToString();
  struct Io {
    Bio bio;
    AlignedBuffer buf;
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
  };
  auto write = [&](uint64_t block, char fill, bool fua) {
    Io io;
    io.buf = AlignedBuffer(kBlock, dev_->dio_align());
    std::memset(io.buf.data(), fill, kBlock);
    io.bio.op = Bio::Op::kWrite;
    io.bio.dev_offset = block * kBlock;
    io.bio.buf = io.buf.data();
    io.bio.len = kBlock;
    io.bio.fua = fua;
    io.bio.private_data = &io;
    io.bio.end_io = [](Bio* b) {
      auto* io = static_cast<Io*>(b->private_data);
      std::lock_guard<std::mutex> l(io->mu);
      io->done = true;
      io->cv.notify_all();
    };
    poller->Submit(&io.bio);
    std::unique_lock<std::mutex> l(io.mu);
    ASSERT_TRUE(io.cv.wait_for(l, std::chrono::seconds(60), [&] { return io.done; }));
    ASSERT_EQ(io.bio.result, static_cast<int32_t>(kBlock));
  };
  write(0, 'a', /*fua=*/true);   // durable at completion
  write(1, 'b', /*fua=*/false);  // lost
  write(2, 'c', /*fua=*/false);
  write(2, 'd', /*fua=*/true);   // makes block 2 durable as 'd'
  write(2, 'e', /*fua=*/false);  // lost: back to 'd'
  poller.reset();
  ASSERT_EQ(Blocks(), "abezzzzzzzzzzzzz");
  EXPECT_EQ(PowerCut().device_bytes, 2u * kBlock);
  EXPECT_EQ(Blocks(), "azdzzzzzzzzzzzzz");
}

// A daemon killed while it logged leaves a torn last record; its write was
// not yet submitted, so it has nothing to undo.
TEST_F(UndoLogTest, ATornLastRecordIsIgnored) {
  Write(0, 'a');
  Write(1, 'b');
  dev_.reset();
  struct stat st{};
  ASSERT_EQ(::stat(log_.c_str(), &st), 0);
  ASSERT_EQ(::truncate(log_.c_str(), st.st_size - 100), 0);
  RolledBack r;
  Status s = RollBackUnflushedWrites(log_, backing_, UnsyncedFiles::kLost, &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(r.device_bytes, uint64_t{kBlock});
  EXPECT_EQ(Blocks(), "zbzzzzzzzzzzzzzz");
}

// The metadata store's files: each created file is cut back to its last
// sync (to nothing if never synced); a file since removed stays removed.
TEST_F(UndoLogTest, CreatedFilesAreCutBackToTheirLastSync) {
  RolledBack r;
  auto make = [&](const std::string& name, size_t size) {
    const std::string path = dir_.Sub(name);
    UniqueFd fd(::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600));
    EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
    return path;
  };
  UndoLog* log = dev_->undo_log();
  const std::string wal = make("000007.log", 300), never = make("000008.log", 200);
  const std::string gone = make("000009.sst", 100), old = make("000006.log", 50);
  for (const std::string* p : {&wal, &never, &gone}) log->FileCreated(*p);
  log->FileSynced(wal, 120);
  log->FileSynced(wal, 250);
  log->FileSynced(old, 10);  // not created by this mount: kept whole
  ASSERT_EQ(::unlink(gone.c_str()), 0);
  // Written back before the cut: every file keeps what reached it.
  ASSERT_EQ(RollBackUnflushedWrites(log_, backing_, UnsyncedFiles::kWrittenBack, &r).ok(), true);
  EXPECT_EQ(r.file_bytes, 0u);
  EXPECT_EQ(SizeOf(wal), 300);
  EXPECT_EQ(PowerCut().file_bytes, 50u + 200u);
  EXPECT_EQ(SizeOf(wal), 250);
  EXPECT_EQ(SizeOf(never), 0);
  EXPECT_EQ(SizeOf(gone), -1);
  EXPECT_EQ(SizeOf(old), 50);
}

// The store's files through the ordered file system: creation, and what
// each sync covered, are logged.
TEST_F(UndoLogTest, TheStoresFileSystemLogsItsFilesAndSyncs) {
  std::shared_ptr<rocksdb::FileSystem> fs = NewOrderedFileSystem(std::make_shared<DataBarrier>(), dev_->undo_log());
  const std::string path = dir_.Sub("000012.log");
  std::unique_ptr<rocksdb::FSWritableFile> f;
  ASSERT_TRUE(fs->NewWritableFile(path, rocksdb::FileOptions(), &f, nullptr).ok());
  const std::string bytes(150, 'w');
  ASSERT_TRUE(f->Append(rocksdb::Slice(bytes.data(), 100), rocksdb::IOOptions(), nullptr).ok());
  ASSERT_TRUE(f->Sync(rocksdb::IOOptions(), nullptr).ok());
  ASSERT_TRUE(f->Append(rocksdb::Slice(bytes.data(), 50), rocksdb::IOOptions(), nullptr).ok());
  ASSERT_TRUE(f->Close(rocksdb::IOOptions(), nullptr).ok());
  f.reset();
  ASSERT_EQ(SizeOf(path), 150);
  EXPECT_EQ(PowerCut().file_bytes, 50u);
  EXPECT_EQ(SizeOf(path), 100);
}

// A flush covers only the writes that completed before it started, and a
// FUA write's completion only that write.
TEST_F(UndoLogTest, FlushAndFuaCoverOnlyWhatCompletedBeforeThem) {
  UndoLog* log = dev_->undo_log();
  LoggedWrite(0, 'a');
  const uint64_t in_flight = LoggedWrite(1, 'c', /*complete=*/false);
  const uint64_t mark = log->FlushStarts();
  LoggedWrite(0, 'b');           // during the flush: not covered
  log->Completed(in_flight, false);  // completed after the flush began: not covered
  log->Flushed(mark);
  const uint64_t fua = LoggedWrite(2, 'd', /*complete=*/false, /*fua=*/true);
  LoggedWrite(2, 'e');  // while the FUA write is in flight: not covered by its completion
  log->Completed(fua, /*fua=*/true);
  ASSERT_EQ(Blocks(), "bcezzzzzzzzzzzzz");
  EXPECT_EQ(PowerCut().device_bytes, 3u * kBlock);
  EXPECT_EQ(Blocks(), "azdzzzzzzzzzzzzz");
}

TEST_F(UndoLogTest, AFileThatIsNoUndoLogIsRefusedUntouched) {
  Write(0, 'a');
  dev_.reset();
  RolledBack r;
  Status s = RollBackUnflushedWrites(backing_, backing_, UnsyncedFiles::kLost, &r);
  EXPECT_EQ(s.err(), EINVAL) << s.ToString();
  EXPECT_NE(s.message().find("not an undo log"), std::string::npos) << s.message();
  EXPECT_EQ(r.device_bytes, 0u);
  EXPECT_EQ(Blocks(), "azzzzzzzzzzzzzzz");
}

}  // namespace
}  // namespace deferfs
