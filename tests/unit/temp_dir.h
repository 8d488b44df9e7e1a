// TempDir: a mkdtemp directory under /tmp for one test, removed with
// everything in it on scope exit (also when an assertion leaves the test).
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <string>

namespace deferfs {

class TempDir {
 public:
  TempDir() {
    std::string tmpl = "/tmp/deferfs-unit.XXXXXX";
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // Empty if mkdtemp failed.
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace deferfs
