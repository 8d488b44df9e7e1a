// Status: the result of an operation that can fail, LevelDB-style.
// A Status is ok() or carries an errno-style code and a one-line message
// that says what is wrong and what to do. Value type; thread-compatible.
#pragma once

#include <cerrno>
#include <string>
#include <utility>

namespace deferfs {

class Status {
 public:
  Status() = default;  // OK

  static Status Ok() { return Status(); }
  // `err` is a positive errno value (EIO, ENOSPC, ...).
  static Status Error(int err, std::string msg) { return Status(err, std::move(msg)); }
  static Status IoError(std::string msg) { return Status(EIO, std::move(msg)); }
  static Status Invalid(std::string msg) { return Status(EINVAL, std::move(msg)); }
  static Status NotFound(std::string msg) { return Status(ENOENT, std::move(msg)); }
  static Status NoSpace(std::string msg) { return Status(ENOSPC, std::move(msg)); }

  bool ok() const { return err_ == 0; }
  // Positive errno; 0 when ok().
  int err() const { return err_; }
  const std::string& message() const { return msg_; }
  std::string ToString() const { return ok() ? "OK" : msg_; }

 private:
  Status(int err, std::string msg) : err_(err), msg_(std::move(msg)) {}

  int err_ = 0;
  std::string msg_;
};

// Propagates a non-ok Status to the caller.
#define DEFERFS_RETURN_IF_ERROR(expr)          \
  do {                                         \
    ::deferfs::Status _st = (expr);            \
    if (!_st.ok()) return _st;                 \
  } while (0)

}  // namespace deferfs
