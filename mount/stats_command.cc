// deferfs stats: asks a live mount for its report through an ioctl on the
// mount's root directory and prints it as a table, or as JSON for scripts;
// --watch redraws it every second with per-second rates.
#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "backend/device.h"
#include "fs/latency.h"
#include "fs/stats_ioctl.h"
#include "mount/commands.h"

namespace deferfs {
namespace {

// Flattens the report's JSON (objects of numbers, strings and arrays of
// numbers, as fs/stats.cc writes it) into "group.name" / value rows, in
// order; an array's value is its JSON text.
class Flattener {
 public:
  explicit Flattener(const std::string& s) : s_(s) {}
  bool Run(std::vector<std::pair<std::string, std::string>>* rows) {
    rows_ = rows;
    return Object("");
  }

 private:
  bool Object(const std::string& prefix) {
    if (!Eat('{')) return false;
    if (Eat('}')) return true;
    do {
      std::string key;
      if (!String(&key) || !Eat(':')) return false;
      std::string path = prefix.empty() ? key : prefix + "." + key;
      if (Peek() == '{') {
        if (!Object(path)) return false;
      } else {
        std::string v;
        bool ok = Peek() == '"' ? String(&v) : Peek() == '[' ? Array(&v) : Scalar(&v);
        if (!ok) return false;
        rows_->emplace_back(path, v);
      }
    } while (Eat(','));
    return Eat('}');
  }
  bool String(std::string* out) {
    if (!Eat('"')) return false;
    while (i_ < s_.size() && s_[i_] != '"') out->push_back(s_[i_++]);
    return Eat('"');
  }
  bool Array(std::string* out) {
    int depth = 0;
    do {
      char c = Peek();
      if (c == '\0' || c == '"' || c == '{') return false;
      depth += (c == '[') - (c == ']');
      out->push_back(s_[i_++]);
    } while (depth > 0);
    return true;
  }
  bool Scalar(std::string* out) {
    while (i_ < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[i_])) || s_[i_] == '.' || s_[i_] == '-')) {
      out->push_back(s_[i_++]);
    }
    return !out->empty();
  }
  char Peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  bool Eat(char c) {
    if (Peek() != c) return false;
    i_++;
    return true;
  }

  const std::string& s_;
  size_t i_ = 0;
  std::vector<std::pair<std::string, std::string>>* rows_ = nullptr;
};

using Rows = std::vector<std::pair<std::string, std::string>>;

// The mount's report; `reset` starts its counters anew after this one.
Status FetchStats(const std::string& mnt, bool reset, std::string* out) {
  UniqueFd fd(open(mnt.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return Status::Error(errno, "cannot open " + mnt + ": " + strerror(errno));
  std::string buf(kStatsIoctlBytes, '\0');
  if (ioctl(fd.get(), reset ? kIocStatsReset : kIocStats, buf.data()) != 0) {
    if (errno == ENOTTY || errno == ENOSYS || errno == EINVAL) return Status::Invalid(mnt + " is not a deferfs mount");
    return Status::Error(errno, "stats of " + mnt + " failed: " + strerror(errno));
  }
  buf.resize(strnlen(buf.data(), buf.size()));
  *out = std::move(buf);
  return Status::Ok();
}

Status FetchRows(const std::string& mnt, bool reset, Rows* rows) {
  std::string json;
  DEFERFS_RETURN_IF_ERROR(FetchStats(mnt, reset, &json));
  rows->clear();
  if (!Flattener(json).Run(rows)) return Status::Invalid("cannot parse the stats of " + mnt);
  return Status::Ok();
}

// The report's groups of monotonic counters (everything else is a gauge,
// the mount's configuration, or a latency summary).
bool IsCounter(const std::string& key) {
  for (std::string_view g : {"dio.", "completions.", "workers.", "pollers.", "fuse.", "metadata."}) {
    if (key.starts_with(g)) return true;
  }
  return false;
}

bool IsConfig(const std::string& key) {
  for (std::string_view k : {"mode", "ring_depth", "transport"}) {
    if (key == k) return true;
  }
  return key.starts_with("threads.");
}

double Num(const std::string& v) { return std::strtod(v.c_str(), nullptr); }

// A latency path's "histogram": [[ns,count],...] into buckets.
bool ParseBuckets(const std::string& text, LatencyHistogram::Buckets* out) {
  out->clear();
  const char* p = text.c_str();
  while (*p != '\0') {
    if (*p == '[' && std::isdigit(static_cast<unsigned char>(p[1]))) {
      char* end = nullptr;
      uint64_t ns = std::strtoull(p + 1, &end, 10);
      if (*end != ',') return false;
      uint64_t n = std::strtoull(end + 1, &end, 10);
      if (*end != ']') return false;
      out->emplace_back(ns, n);
      p = end;
    }
    p++;
  }
  return true;
}

// One refresh of --watch: counters with their rate over the last `secs`,
// gauges, and latency per path over the last interval. With `reset` every
// report covers only the last interval, so the values themselves are the
// deltas; without, the percentiles come from the histograms' difference.
std::string WatchBlock(const std::string& mnt, const Rows& prev, const Rows& cur, double secs, bool reset) {
  const std::map<std::string, std::string> before(prev.begin(), prev.end());
  auto rate = [&](const std::string& k, double v) {
    auto it = before.find(k);
    return (reset || it == before.end() ? v : v - Num(it->second)) / secs;
  };

  std::string out = "deferfs stats " + mnt + " every 1 s:";
  for (const auto& [k, v] : cur) {
    if (IsConfig(k)) out += " " + k + " " + v;
  }
  out += "\n\n";
  char line[256];
  std::snprintf(line, sizeof(line), "%-32s %14s %12s\n", "counter", reset ? "interval" : "total", "per second");
  out += line;
  for (const auto& [k, v] : cur) {
    if (!IsCounter(k)) continue;
    std::snprintf(line, sizeof(line), "%-32s %14s %12.0f\n", k.c_str(), v.c_str(), rate(k, Num(v)));
    out += line;
  }
  out += "\n";
  bool gauges = false;
  for (const auto& [k, v] : cur) {
    if (IsCounter(k) || IsConfig(k) || k.starts_with("latency.")) continue;
    if (!gauges) {
      std::snprintf(line, sizeof(line), "%-32s %14s\n", "gauge", "now");
      out += line;
      gauges = true;
    }
    std::snprintf(line, sizeof(line), "%-32s %14s\n", k.c_str(), v.c_str());
    out += line;
  }
  if (gauges) out += "\n";

  // latency.<path>.<field>, grouped by path in report order.
  std::vector<std::string> paths;
  std::map<std::string, std::map<std::string, std::string>> lat;
  for (const auto& [k, v] : cur) {
    if (!k.starts_with("latency.")) continue;
    size_t dot = k.rfind('.');
    std::string path = k.substr(8, dot - 8);
    if (lat.find(path) == lat.end()) paths.push_back(path);
    lat[path][k.substr(dot + 1)] = v;
  }
  std::string rows;
  bool lifetime = false;  // a path without histograms: its percentiles cover the mount's life
  for (const std::string& p : paths) {
    auto& f = lat[p];
    std::string p50 = f["p50_us"], p99 = f["p99_us"], max = f["max_us"];
    LatencyHistogram::Buckets then, now;
    auto then_text = before.find("latency." + p + ".histogram");
    if (reset) {
      // The report covers the interval already.
      if (Num(f["count"]) == 0) p50 = p99 = max = "-";
    } else if (then_text != before.end() && ParseBuckets(then_text->second, &then) &&
               f.count("histogram") != 0 && ParseBuckets(f["histogram"], &now)) {
      LatencyHistogram::Summary s = LatencyHistogram::SummarizeBuckets(LatencyHistogram::Since(then, now));
      auto us = [&](double v) {
        char b[32];
        std::snprintf(b, sizeof(b), "%.1f", v);
        return s.count == 0 ? std::string("-") : std::string(b);
      };
      p50 = us(s.p50_us), p99 = us(s.p99_us), max = us(s.max_us);
    } else {
      lifetime = true;
    }
    std::snprintf(line, sizeof(line), "%-20s %12.0f %10s %10s %10s\n", p.c_str(),
                  rate("latency." + p + ".count", Num(f["count"])), p50.c_str(), p99.c_str(), max.c_str());
    rows += line;
  }
  std::snprintf(line, sizeof(line), "%-20s %12s %10s %10s %10s   (us, %s)\n", "latency", "per second", "p50", "p99",
                "max", lifetime ? "since mount or reset" : "last interval");
  out += line;
  return out + rows;
}

// --watch: a block per second until `count` blocks or SIGINT/SIGTERM. On a
// terminal each block replaces the last; otherwise blocks follow each other
// separated by a blank line, without escape codes.
int Watch(const StatsArgs& args) {
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);  // taken by sigtimedwait: a clean stop
  const bool tty = isatty(STDOUT_FILENO) == 1;

  Rows prev, cur;
  Status s = FetchRows(args.mountpoint, args.reset, &prev);
  if (!s.ok()) return Fail(s.message());
  auto prev_t = std::chrono::steady_clock::now();
  for (unsigned n = 0; args.count == 0 || n < args.count; n++) {
    // Sleep a second, or stop at once on a signal.
    const timespec one_second{1, 0};
    if (sigtimedwait(&sigs, nullptr, &one_second) > 0) break;
    s = FetchRows(args.mountpoint, args.reset, &cur);
    if (!s.ok()) return Fail(s.message());
    auto now = std::chrono::steady_clock::now();
    double secs = std::chrono::duration<double>(now - prev_t).count();
    std::string block = WatchBlock(args.mountpoint, prev, cur, secs, args.reset);
    if (tty) {
      std::fputs("\033[H\033[2J", stdout);  // home, clear screen
    } else if (n > 0) {
      std::fputc('\n', stdout);
    }
    std::fputs(block.c_str(), stdout);
    std::fflush(stdout);
    prev.swap(cur);
    prev_t = now;
  }
  return 0;
}

}  // namespace

int StatsCommand(const StatsArgs& args) {
  if (args.watch && args.json) return Fail("stats: --watch and --json do not mix: pick one");
  if (!args.watch && args.count != 0) return Fail("stats: --count needs --watch");
  if (args.watch) return Watch(args);
  const std::string& mnt = args.mountpoint;
  const bool json = args.json;
  std::string buf;
  Status st = FetchStats(mnt, args.reset, &buf);
  if (!st.ok()) return Fail(st.message());
  if (json) {
    std::printf("%s\n", buf.c_str());
    return 0;
  }
  Rows rows;
  if (!Flattener(buf).Run(&rows)) return Fail("cannot parse the stats of " + mnt);
  // Histograms are for --json and --watch; a table row cannot hold one.
  std::erase_if(rows, [](const auto& row) { return row.first.ends_with(".histogram"); });
  size_t width = 0;
  for (const auto& [k, v] : rows) width = std::max(width, k.size());
  for (const auto& [k, v] : rows) std::printf("%-*s  %s\n", static_cast<int>(width), k.c_str(), v.c_str());
  return 0;
}

}  // namespace deferfs
