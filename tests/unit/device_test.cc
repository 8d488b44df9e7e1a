// Device against real files in a private temporary directory.
#include "backend/device.h"
#include "tests/unit/temp_dir.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

namespace deferfs {
namespace {


void MakeFile(const std::string& path, uint64_t size) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  ASSERT_TRUE(fd.valid()) << path << ": " << std::strerror(errno);
  ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
}

class DeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    path_ = dir_.path() + "/backing";
    MakeFile(path_, kSize);
  }
  static constexpr uint64_t kSize = 16 << 20;
  TempDir dir_;
  std::string path_;
};

TEST_F(DeviceTest, OpensRegularFile) {
  std::unique_ptr<Device> dev;
  Status st = Device::Open(path_, &dev);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(dev->size(), kSize);
  EXPECT_FALSE(dev->is_block_device());
  EXPECT_EQ(dev->path(), path_);
  const uint32_t a = dev->dio_align();
  EXPECT_GE(a, 512u);
  EXPECT_EQ(a & (a - 1), 0u) << a;
  int fl = fcntl(dev->fd(), F_GETFL);
  EXPECT_TRUE(fl & O_DIRECT);
  EXPECT_EQ(fl & O_ACCMODE, O_RDWR);
  EXPECT_TRUE(fcntl(dev->fd(), F_GETFD) & FD_CLOEXEC);
}

TEST_F(DeviceTest, MissingPathIsNotFoundAndNamesThePath) {
  const std::string missing = dir_.path() + "/nope";
  std::unique_ptr<Device> dev;
  Status st = Device::Open(missing, &dev);
  EXPECT_EQ(st.err(), ENOENT);
  EXPECT_NE(st.message().find(missing), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("mkfs"), std::string::npos) << st.message();
  EXPECT_EQ(dev, nullptr);
}

TEST_F(DeviceTest, RejectsDirectoryAndCharacterDevice) {
  std::unique_ptr<Device> dev;
  Status st = Device::Open(dir_.path(), &dev);
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(st.err(), EISDIR);
  EXPECT_NE(st.message().find(dir_.path()), std::string::npos) << st.message();
  EXPECT_EQ(dev, nullptr);

  st = Device::Open("/dev/null", &dev);
  EXPECT_EQ(st.err(), EINVAL);
  EXPECT_NE(st.message().find("/dev/null"), std::string::npos) << st.message();
  EXPECT_EQ(dev, nullptr);
}

TEST_F(DeviceTest, SecondExclusiveLockIsBusy) {
  std::unique_ptr<Device> a, b;
  ASSERT_TRUE(Device::Open(path_, &a).ok());
  ASSERT_TRUE(Device::Open(path_, &b).ok());
  Status st = a->LockExclusive();
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(a->LockExclusive().ok());  // idempotent on the holder
  st = b->LockExclusive();
  EXPECT_EQ(st.err(), EBUSY);
  EXPECT_NE(st.message().find(path_), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("in use"), std::string::npos) << st.message();
  // The lock lives as long as the holder.
  a.reset();
  EXPECT_TRUE(b->LockExclusive().ok());
}

TEST_F(DeviceTest, SyncWriteReadRoundTrip) {
  std::unique_ptr<Device> dev;
  ASSERT_TRUE(Device::Open(path_, &dev).ok());
  const uint32_t len = 64 << 10;
  AlignedBuffer out(len, dev->dio_align()), in(len, dev->dio_align());
  ASSERT_NE(out.data(), nullptr);
  ASSERT_EQ(reinterpret_cast<uintptr_t>(out.data()) % dev->dio_align(), 0u);
  for (uint32_t i = 0; i < len; ++i) out.bytes()[i] = static_cast<uint8_t>(i * 31 + 7);
  const uint64_t off = 3 * 4096 * 16;
  Status st = dev->WriteSync(off, out.data(), len);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(dev->FlushSync().ok());
  st = dev->ReadSync(off, in.data(), len);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(std::memcmp(in.data(), out.data(), len), 0);

  // The bytes really are in the file at that offset (read without the device).
  std::string plain(len, '\0');
  UniqueFd fd(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_EQ(::pread(fd.get(), plain.data(), len, off), static_cast<ssize_t>(len));
  EXPECT_EQ(std::memcmp(plain.data(), out.data(), len), 0);
}

TEST_F(DeviceTest, SyncIoRejectsMisalignmentAndShortTransfers) {
  std::unique_ptr<Device> dev;
  ASSERT_TRUE(Device::Open(path_, &dev).ok());
  const uint32_t a = dev->dio_align();
  AlignedBuffer buf(2 * a, a);
  EXPECT_EQ(dev->WriteSync(1, buf.data(), a).err(), EINVAL);
  EXPECT_EQ(dev->WriteSync(0, buf.bytes() + 1, a).err(), EINVAL);
  EXPECT_EQ(dev->ReadSync(0, buf.data(), a + 1).err(), EINVAL);
  // Reading across the end of the file transfers less than asked: EIO.
  Status st = dev->ReadSync(kSize - a, buf.data(), 2 * a);
  EXPECT_EQ(st.err(), EIO) << st.ToString();
  st = dev->ReadSync(kSize, buf.data(), a);
  EXPECT_EQ(st.err(), EIO) << st.ToString();
  // And the device still works afterwards.
  EXPECT_TRUE(dev->ReadSync(0, buf.data(), a).ok());
}

}  // namespace
}  // namespace deferfs
