// Completion batches (fs/task_work.h): who may hand work to a batch, and
// that every batch is finished before the thread goes on. The dio engine's
// use of them (one metadata commit per inode per batch) is in dio_test.
#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "fs/task_work.h"
#include "fs/workqueue.h"

namespace deferfs {
namespace {

// Records what it was asked to finish; `on_complete` runs inside Complete().
class CountingBatch final : public CompletionBatch {
 public:
  void Complete() override {
    completions++;
    held_at_complete.push_back(held);
    held = 0;
    if (on_complete) on_complete();
  }

  int held = 0;  // handed in since the last Complete()
  int completions = 0;
  std::vector<int> held_at_complete;
  std::function<void()> on_complete;
};

TEST(CompletionBatchTest, OnlyTheOutermostRunBatchTakesWorkAndFinishesItBeforeReturning) {
  TaskWork tw;
  CountingBatch batch;
  EXPECT_FALSE(tw.DeferToBatch(&batch)) << "outside a batch, work must complete at once";

  tw.RunBatch([&] {
    for (int i = 0; i < 3; i++) {
      ASSERT_TRUE(tw.DeferToBatch(&batch));
      batch.held++;
    }
    tw.RunBatch([&] { EXPECT_FALSE(tw.DeferToBatch(&batch)) << "a nested batch (a completion that waits)"; });
    EXPECT_EQ(batch.completions, 0) << "the nested RunBatch finished the outer one's work";
  });
  EXPECT_EQ(batch.completions, 1);
  EXPECT_EQ(batch.held_at_complete, std::vector<int>{3});

  tw.RunBatch([] {});
  EXPECT_EQ(batch.completions, 1) << "a batch with nothing handed in is not completed again";
}

TEST(CompletionBatchTest, ABatchThatWaitsWhileCompletingIsNotCompletedTwice) {
  TaskWork tw;
  CountingBatch batch;
  // Completing may run task_work (a wait inside a metadata commit): that
  // nested run neither takes work nor completes the batch under way.
  batch.on_complete = [&] {
    tw.RunBatch([&] { EXPECT_FALSE(tw.DeferToBatch(&batch)); });
  };
  tw.RunBatch([&] {
    ASSERT_TRUE(tw.DeferToBatch(&batch));
    batch.held++;
  });
  EXPECT_EQ(batch.completions, 1);
}

TEST(CompletionBatchTest, RunPendingCompletesHeldRequestsBeforeItReturns) {
  struct Req {
    Kiocb iocb;  // first: ki_complete gets back to the Req
    CountingBatch* batch = nullptr;
    TaskWork* tw = nullptr;
    std::vector<Req*>* held = nullptr;
    ssize_t res = 0;
    int calls = 0;
  };
  TaskWork tw;
  CountingBatch batch;
  std::vector<Req*> held;
  // The batch finishes what it holds with ki_complete, as DioBatch does.
  batch.on_complete = [&] {
    for (Req* r : held) r->iocb.ki_complete(&r->iocb, 7);
    held.clear();
  };
  std::vector<Req> reqs(4);
  for (size_t i = 0; i < reqs.size(); i++) {
    Req& r = reqs[i];
    r.batch = &batch;
    r.tw = &tw;
    r.held = &held;
    r.iocb.ki_complete = [](Kiocb* iocb, ssize_t res) {
      Req* r = reinterpret_cast<Req*>(iocb);
      ASSERT_EQ(iocb->dio_complete, nullptr) << "ki_complete must see dio_complete cleared";
      r->res = res;
      r->calls++;
    };
    r.iocb.private_data = &r;
    // Even requests join the batch; odd ones complete at once with 5.
    r.iocb.dio_complete = i % 2 == 0 ? +[](void* data) -> ssize_t {
      Req* r = static_cast<Req*>(data);
      if (!r->tw->DeferToBatch(r->batch)) return -1;
      r->held->push_back(r);
      return kIocbQueued;
    }
                                     : +[](void*) -> ssize_t { return 5; };
    tw.Push(&r.iocb);
  }
  EXPECT_EQ(tw.RunPending(), reqs.size());
  EXPECT_EQ(batch.completions, 1);
  for (size_t i = 0; i < reqs.size(); i++) {
    EXPECT_EQ(reqs[i].calls, 1) << "request " << i;
    EXPECT_EQ(reqs[i].res, i % 2 == 0 ? 7 : 5) << "request " << i;
  }
}

// The first item holds the completion thread until the test has queued the rest.
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  bool running = false;
  bool release = false;
};

struct BatchedItem {
  WorkItem work;
  CountingBatch* batch = nullptr;
  std::atomic<int>* deferred = nullptr;
};

TEST(CompletionBatchTest, WorkqueueRunsQueuedItemsAsOneBatch) {
  constexpr int kItems = 10;  // fewer than a completion thread takes at once
  CountingBatch batch;         // touched only by the one completion thread
  std::atomic<int> deferred{0};
  Gate gate;
  WorkItem first;
  first.data = &gate;
  first.fn = [](WorkItem* w) {
    auto* g = static_cast<Gate*>(w->data);
    std::unique_lock l(g->mu);
    g->running = true;
    g->cv.notify_all();
    g->cv.wait(l, [g] { return g->release; });
  };
  std::vector<BatchedItem> items(kItems);
  {
    Workqueue wq(1);
    wq.Queue(&first);
    {
      std::unique_lock l(gate.mu);
      gate.cv.wait(l, [&] { return gate.running; });
    }
    for (BatchedItem& it : items) {
      it.batch = &batch;
      it.deferred = &deferred;
      it.work.data = &it;
      it.work.fn = [](WorkItem* w) {
        auto* it = static_cast<BatchedItem*>(w->data);
        if (TaskWork::Current()->DeferToBatch(it->batch)) it->deferred->fetch_add(1);
      };
      wq.Queue(&it.work);
    }
    {
      std::lock_guard l(gate.mu);
      gate.release = true;
    }
    gate.cv.notify_all();
  }  // ~Workqueue runs everything queued, then joins
  EXPECT_EQ(deferred.load(), kItems) << "work on a completion thread may join its batch";
  EXPECT_EQ(batch.completions, 1) << "the items queued together ran as one batch, completed once";
}

}  // namespace
}  // namespace deferfs
