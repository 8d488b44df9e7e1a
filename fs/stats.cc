// The stats report behind `deferfs stats`: where completions ran, wakeups
// made and avoided, poller batching, buffers, live objects (gauges that read
// 0 when idle, see fs/live_gauges.h) and latency summaries.
#include <cstdio>
#include <cstring>
#include <iterator>

#include "fs/filesystem.h"

namespace deferfs {
namespace {

// A path's summary, without its closing brace.
std::string LatencySummary(const char* name, const LatencyHistogram& h) {
  const LatencyHistogram::Summary s = h.Summarize();
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "\"%s\":{\"count\":%llu,\"mean_us\":%.1f,\"p50_us\":%.1f,\"p99_us\":%.1f,\"max_us\":%.1f", name,
                static_cast<unsigned long long>(s.count), s.mean_us, s.p50_us, s.p99_us, s.max_us);
  return buf;
}

// A path's non-empty buckets as [ns, count] pairs: from two reports
// `stats --watch` takes the percentiles of the interval between them.
std::string LatencyHistogramJson(const LatencyHistogram& h) {
  std::string out = ",\"histogram\":[";
  char buf[64];
  for (const auto& [ns, n] : h.NonEmptyBuckets()) {
    std::snprintf(buf, sizeof(buf), "%s[%llu,%llu]", out.back() == '[' ? "" : ",",
                  static_cast<unsigned long long>(ns), static_cast<unsigned long long>(n));
    out += buf;
  }
  return out + "]";
}

}  // namespace

void Filesystem::RegisterTaskWork(TaskWork* tw) {
  std::lock_guard l(stats_mu_);
  task_works_.push_back(tw);
}

void Filesystem::UnregisterTaskWorks() {
  std::lock_guard l(stats_mu_);
  task_works_.clear();
}

std::string Filesystem::StatsJson(bool reset, size_t max_bytes) {
  DioStats& d = engine_->stats();
  // Counters in report order: group, name, value.
  struct Counter {
    const char* group;
    const char* name;
    uint64_t value;
  };
  std::vector<Counter> c = {
      {"dio", "reads", d.reads.load()},
      {"dio", "writes", d.writes.load()},
      {"dio", "pure_overwrites", d.pure_overwrites.load()},
      {"dio", "errors", d.errors.load()},
      {"completions", "inline_poller", d.completed_inline.load()},
      {"completions", "deferred_issuer", d.completed_deferred.load()},
      {"completions", "workqueue", d.completed_workqueue.load()},
      {"completions", "sync_issuer", d.completed_sync.load()},
      {"completions", "at_submit", d.completed_at_submit.load()},
  };
  size_t inodes;
  {
    std::lock_guard ns(ns_mu_);
    inodes = inodes_.size();
  }
  uint64_t tw_run = 0, tw_made = 0, tw_avoided = 0;
  std::lock_guard l(stats_mu_);
  for (TaskWork* tw : task_works_) {
    tw_run += tw->stats().deferred_run.load();
    tw_made += tw->stats().wakeups_made.load();
    tw_avoided += tw->stats().wakeups_avoided.load();
  }
  c.push_back({"workers", "task_work_run", tw_run});
  c.push_back({"workers", "wakeups_made", tw_made});
  c.push_back({"workers", "wakeups_avoided", tw_avoided});
  Poller::Stats p{};
  for (const auto& poller : pollers_) {
    Poller::Stats s = poller->stats();
    p.submitted += s.submitted;
    p.completed += s.completed;
    p.wakeups_made += s.wakeups_made;
    p.wakeups_avoided += s.wakeups_avoided;
    p.sleeps += s.sleeps;
    p.submit_batches += s.submit_batches;
  }
  c.push_back({"pollers", "bios_submitted", p.submitted});
  c.push_back({"pollers", "bios_completed", p.completed});
  c.push_back({"pollers", "wakeups_made", p.wakeups_made});
  c.push_back({"pollers", "wakeups_avoided", p.wakeups_avoided});
  c.push_back({"pollers", "sleeps", p.sleeps});
  c.push_back({"pollers", "submit_batches", p.submit_batches});
  c.push_back({"fuse", "dev_requests", fuse_stats_.dev_requests.load()});
  c.push_back({"fuse", "ring_requests", fuse_stats_.ring_requests.load()});
  c.push_back({"fuse", "remote_commits", fuse_stats_.remote_commits.load()});
  c.push_back({"fuse", "ring_copied_bytes", fuse_stats_.ring_copied_bytes.load()});
  // The durability machinery: how often the data barrier flushed the device
  // and the WAL was written out and synced, against the commits made.
  c.push_back({"metadata", "commits", meta_->commits()});
  c.push_back({"metadata", "wal_syncs", meta_->wal_syncs()});
  c.push_back({"metadata", "device_flushes", meta_->barrier().flushes()});
  c.push_back({"metadata", "xattr_reads", meta_->xattr_reads()});

  // Counters only grow: a reset is a baseline subtracted from then on.
  if (stats_base_.size() != c.size()) stats_base_.assign(c.size(), {"", 0});
  // The thread counts have an object of their own: "workers" and "pollers"
  // are also counter groups, and a JSON object must not repeat a key.
  std::string out = "{\"mode\":\"" + std::string(CompletionModeName(opt_.completion)) + "\",\"threads\":{\"workers\":" +
                    std::to_string(opt_.workers) + ",\"pollers\":" + std::to_string(opt_.pollers) +
                    ",\"cthreads\":" + std::to_string(opt_.cthreads) + "},\"ring_depth\":" + std::to_string(opt_.ring_depth) +
                    ",\"transport\":\"" + transport_.load(std::memory_order_relaxed) + "\"";
  const char* group = "";
  for (size_t i = 0; i < c.size(); i++) {
    if (std::string_view(group) != c[i].group) {
      out += std::string(i ? "}" : "") + ",\"" + c[i].group + "\":{";
      group = c[i].group;
    } else {
      out += ",";
    }
    out += "\"" + std::string(c[i].name) + "\":" + std::to_string(c[i].value - stats_base_[i].second);
    if (reset) stats_base_[i] = {c[i].name, c[i].value};
  }
  out += "},\"dio_inflight\":" + std::to_string(d.inflight.load());
  // in_use includes the receive buffer each idle FUSE worker keeps and, with
  // transport=uring, the ring slots' buffers (`ring`).
  const size_t free_buffers = buffers_->available();
  out += ",\"buffers\":{\"total\":" + std::to_string(opt_.io_buffers) + ",\"free\":" + std::to_string(free_buffers) +
         ",\"in_use\":" + std::to_string(opt_.io_buffers - free_buffers) +
         ",\"ring\":" + std::to_string(fuse_stats_.ring_buffers.load(std::memory_order_relaxed)) + "}";
  auto gauge = [](const std::atomic<int64_t>& g) { return std::to_string(g.load(std::memory_order_relaxed)); };
  out += ",\"live\":{\"fuse_requests\":" + gauge(gauges_.fuse_requests) +
         ",\"request_buffers\":" + gauge(gauges_.request_buffers) + ",\"open_files\":" + gauge(gauges_.open_files) +
         ",\"inodes_cached\":" + std::to_string(inodes) +
         ",\"metadata_deferred\":" + std::to_string(meta_->deferred_ops()) + "}";
  const std::pair<const char*, const LatencyHistogram*> paths[] = {{"read_device", &d.read_device},
                                                                    {"read_reply", &d.read_reply},
                                                                    {"write_device", &d.write_device},
                                                                    {"write_reply", &d.write_reply}};
  std::string summaries[std::size(paths)], histograms[std::size(paths)];
  // The report's size without histograms: `,"latency":{`, the summaries
  // each closed and comma-separated, `}}`.
  size_t total = out.size() + std::strlen(",\"latency\":{") + std::size(paths) - 1 + std::strlen("}}");
  for (size_t i = 0; i < std::size(paths); i++) {
    summaries[i] = LatencySummary(paths[i].first, *paths[i].second);
    histograms[i] = LatencyHistogramJson(*paths[i].second);
    total += summaries[i].size() + 1;
  }
  // A histogram too wide for the caller's buffer (and the NUL) is left out,
  // not the report; the others still fit.
  out += ",\"latency\":{";
  for (size_t i = 0; i < std::size(paths); i++) {
    if (i > 0) out += ",";
    out += summaries[i];
    if (total + histograms[i].size() < max_bytes) {
      out += histograms[i];
      total += histograms[i].size();
    }
    out += "}";
  }
  out += "}}";
  if (reset) {
    for (LatencyHistogram* h : {&d.read_device, &d.read_reply, &d.write_device, &d.write_reply}) h->Reset();
  }
  return out;
}

}  // namespace deferfs
