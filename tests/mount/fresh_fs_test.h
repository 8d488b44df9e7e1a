// FreshFsTest: a gtest fixture giving each test a freshly made deferfs (or,
// with DEFERFS_TEST_DIR, a fresh ext4 subdirectory: see mounted_fs.h).
#pragma once

#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <string_view>

#include "tests/mount/mounted_fs.h"

namespace deferfs_test {

class FreshFsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs_.emplace();
    ASSERT_TRUE(fs_->ok()) << "file system set-up failed";
  }
  void TearDown() override { fs_.reset(); }

  std::string P(std::string_view rel) const { return fs_->path(rel); }
  [[nodiscard]] bool Remount() { return fs_->Remount(); }
  bool reference() const { return fs_->reference_mode(); }

  std::optional<MountedFs> fs_;
};

}  // namespace deferfs_test
