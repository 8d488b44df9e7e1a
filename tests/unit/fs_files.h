// Files in the root of a mounted Filesystem, for the unit tests that drive
// it directly (dio_test, fault_test). Failures are reported as gtest
// failures and come back as nullptr.
#pragma once

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <string>

#include "fs/filesystem.h"

namespace deferfs {

// Creates `name` (mode 0644, as root) and returns its open inode.
inline Inode* CreateIn(Filesystem* fs, const std::string& name) {
  struct stat st;
  Inode* inode = nullptr;
  Status s = fs->Create(Caller{0, 0, 022, nullptr}, kRootIno, name, 0644, &st, &inode);
  EXPECT_TRUE(s.ok()) << name << ": " << s.message();
  return inode;
}

// Opens the existing `name`.
inline Inode* OpenIn(Filesystem* fs, const std::string& name) {
  struct stat st;
  Inode* inode = nullptr;
  Status s = fs->Lookup(kRootIno, name, &st);
  if (s.ok()) s = fs->Open(st.st_ino, &inode);
  EXPECT_TRUE(s.ok()) << name << ": " << s.message();
  return inode;
}

// Unlinks the closed file `name`, and the kernel forgets it (as it does once
// nothing holds the inode): the inode is deleted and its blocks are freed.
inline void UnlinkIn(Filesystem* fs, const std::string& name) {
  struct stat st;
  Status s = fs->Lookup(kRootIno, name, &st);
  if (s.ok()) s = fs->Unlink(kRootIno, name);
  ASSERT_TRUE(s.ok()) << name << ": " << s.message();
  const Forgotten all{st.st_ino, UINT64_MAX};
  fs->Forget(std::span(&all, 1));
}

}  // namespace deferfs
