// The command-line error contract every deferfs command keeps: a non-zero
// exit and exactly one stderr line "deferfs: <what is wrong>: <what to do>".
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <string>
#include <string_view>

#include "tests/mount/mounted_fs.h"

namespace deferfs_test {

inline std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// `mention` (case-insensitive), if given, must appear in the message.
inline ::testing::AssertionResult IsCliError(const RunResult& r, std::string_view mention = {}) {
  if (r.timed_out) return ::testing::AssertionFailure() << "did not finish: " << r.Describe();
  if (!r.exited()) return ::testing::AssertionFailure() << "crashed: " << r.Describe();
  if (r.exit_code() == 0) return ::testing::AssertionFailure() << "exit status 0: " << r.Describe();
  const std::string prefix = "deferfs: ";
  if (r.err.rfind(prefix, 0) != 0 || r.err.size() <= prefix.size() + 1) {
    return ::testing::AssertionFailure() << "stderr must start with \"deferfs: \" and say what is wrong: "
                                         << r.Describe();
  }
  if (std::count(r.err.begin(), r.err.end(), '\n') != 1 || r.err.back() != '\n') {
    return ::testing::AssertionFailure() << "stderr must be exactly one line: " << r.Describe();
  }
  if (!mention.empty() && Lower(r.err).find(Lower(std::string(mention))) == std::string::npos) {
    return ::testing::AssertionFailure() << "message should mention \"" << mention << "\": " << r.Describe();
  }
  return ::testing::AssertionSuccess();
}

}  // namespace deferfs_test
