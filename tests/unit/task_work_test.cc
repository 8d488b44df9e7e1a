// TaskWork's callbacks and plug (fs/task_work.h): work queued from another
// thread runs on the owner, in order, and wakes it; an owner that waits
// sends what it gathered (its plug) before it sleeps, so a wait that depends
// on those submissions cannot wait for itself.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "fs/task_work.h"

namespace deferfs {
namespace {

using namespace std::chrono_literals;

struct Recorded {
  TaskWorkCallback cb;  // first: the callback gets from it to the record
  int index = 0;
  std::thread::id ran_on;
  std::vector<int>* order = nullptr;
};

void Record(TaskWorkCallback* cb) {
  auto* r = reinterpret_cast<Recorded*>(cb);
  r->ran_on = std::this_thread::get_id();
  r->order->push_back(r->index);
}

TEST(TaskWorkTest, CallbacksFromAnotherThreadRunOnTheOwnerInOrderAndWakeIt) {
  TaskWork tw;
  std::vector<int> order;
  std::atomic<bool> order_done{false};
  std::vector<Recorded> recs(8);
  for (int i = 0; i < 8; i++) recs[i] = Recorded{{nullptr, &Record}, i, {}, &order};
  std::thread other([&] {
    std::this_thread::sleep_for(20ms);  // let the owner go to sleep first
    for (auto& r : recs) tw.Add(&r.cb);
  });
  // The owner sleeps until the callbacks have run: only Add's wakeup ends it.
  // A bounded wait, so a lost wakeup fails the test instead of hanging it.
  std::atomic<bool> timed_out{false};
  std::thread watchdog([&] {
    for (int i = 0; i < 500 && order_done.load() == false; i++) std::this_thread::sleep_for(10ms);
    if (!order_done.load()) {
      timed_out = true;
      tw.Wake();
    }
  });
  tw.WaitUntil([&] { return order.size() == recs.size() || timed_out.load(); });
  order_done = true;
  other.join();
  watchdog.join();
  ASSERT_FALSE(timed_out.load()) << "Add did not wake the sleeping owner";
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
  for (const auto& r : recs) EXPECT_EQ(r.ran_on, std::this_thread::get_id());
  EXPECT_EQ(tw.RunPending(), 0u);
  EXPECT_FALSE(tw.has_pending());
}

// Submissions the owner holds back; another thread answers only what was sent.
class HeldSubmissions final : public Plug {
 public:
  void Flush() override { sent.store(held, std::memory_order_release); }
  int held = 0;
  std::atomic<int> sent{0};
};

TEST(TaskWorkTest, AWaitSendsThePlugBeforeItSleeps) {
  TaskWork tw;
  HeldSubmissions plug;
  tw.SetPlug(&plug);
  plug.held = 1;
  std::atomic<bool> answered{false}, gave_up{false};
  std::thread peer([&] {
    // Answers once the submission was sent; gives up after 5 s so a missing
    // flush fails the test instead of hanging it.
    auto deadline = std::chrono::steady_clock::now() + 5s;
    while (plug.sent.load(std::memory_order_acquire) == 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(1ms);
    }
    gave_up = plug.sent.load(std::memory_order_acquire) == 0;
    answered = true;
    tw.Wake();
  });
  tw.WaitUntil([&] { return answered.load(); });
  peer.join();
  EXPECT_FALSE(gave_up) << "the owner slept without sending what it held";
  tw.SetPlug(nullptr);
}

}  // namespace
}  // namespace deferfs
