// JournalCommit: the metadata's commit interval, as jbd2's `commit=` is for
// ext4. Commits reach the WAL file only at a sync point (MetaStore::Commit),
// so without this a file that is never fsync'ed would stay in memory until
// unmount. Every interval the thread runs `commit` (Filesystem::SyncMeta:
// device flush if owed, WAL write and fsync, freed blocks released).
// Thread-safe; the destructor stops and joins the thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

namespace deferfs {

class JournalCommit {
 public:
  JournalCommit(std::chrono::milliseconds interval, std::function<void()> commit);
  ~JournalCommit();
  JournalCommit(const JournalCommit&) = delete;
  JournalCommit& operator=(const JournalCommit&) = delete;

 private:
  void Run();

  const std::chrono::milliseconds interval_;
  const std::function<void()> commit_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // guarded by mu_
  std::thread thread_;
};

}  // namespace deferfs
