// deferfs stats: asks a live mount for its report through an ioctl on the
// mount's root directory and prints it as a table, or as JSON for scripts.
#include <fcntl.h>
#include <getopt.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cctype>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "backend/device.h"
#include "fs/stats_ioctl.h"
#include "mount/commands.h"

namespace deferfs {
namespace {

constexpr char kStatsUsage[] =
    "usage: deferfs stats MOUNTPOINT [--json] [--reset]\n"
    "  --json    one JSON object, for scripts\n"
    "  --reset   print, then start counting anew (root only)\n";

// Flattens the report's JSON (objects of numbers and strings only, as
// fs/stats.cc writes it) into "group.name" / value rows, in order.
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
        if (Peek() == '"' ? !String(&v) : !Scalar(&v)) return false;
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

}  // namespace

int StatsCommand(int argc, char** argv) {
  static const option kLong[] = {{"json", no_argument, nullptr, 'j'},
                                 {"reset", no_argument, nullptr, 'r'},
                                 {"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  bool json = false, reset = false;
  opterr = 0;
  optind = 1;
  for (int c; (c = getopt_long(argc, argv, "jrh", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'j': json = true; break;
      case 'r': reset = true; break;
      case 'h': std::fputs(kStatsUsage, stdout); return 0;
      default: return Fail(std::string("stats: unknown option '") + argv[optind - 1] + "': see 'deferfs stats --help'");
    }
  }
  if (optind != argc - 1) return Fail("stats needs exactly one MOUNTPOINT: see 'deferfs stats --help'");
  std::string mnt = argv[optind];
  UniqueFd fd(open(mnt.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return Fail("cannot open " + mnt + ": " + strerror(errno));
  std::string buf(kStatsIoctlBytes, '\0');
  if (ioctl(fd.get(), reset ? kIocStatsReset : kIocStats, buf.data()) != 0) {
    if (errno == ENOTTY || errno == ENOSYS || errno == EINVAL) return Fail(mnt + " is not a deferfs mount");
    return Fail("stats of " + mnt + " failed: " + strerror(errno));
  }
  buf.resize(strnlen(buf.data(), buf.size()));
  if (json) {
    std::printf("%s\n", buf.c_str());
    return 0;
  }
  std::vector<std::pair<std::string, std::string>> rows;
  if (!Flattener(buf).Run(&rows)) return Fail("cannot parse the stats of " + mnt);
  size_t width = 0;
  for (const auto& [k, v] : rows) width = std::max(width, k.size());
  for (const auto& [k, v] : rows) std::printf("%-*s  %s\n", static_cast<int>(width), k.c_str(), v.c_str());
  return 0;
}

}  // namespace deferfs
