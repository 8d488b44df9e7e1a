#include "mount/mountinfo.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

namespace deferfs {

namespace {

struct Entry {
  std::string id, parent, device, path, fstype, source;
};

bool IsOctal(char c) { return c >= '0' && c <= '7'; }

// Paths in mountinfo escape space, tab, newline and backslash as \ooo.
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); i++) {
    if (s[i] == '\\' && i + 3 < s.size() && IsOctal(s[i + 1]) && IsOctal(s[i + 2]) && IsOctal(s[i + 3])) {
      out += static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0'));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

// "id parent major:minor root mountpoint options [optional...] - fstype source superoptions"
std::vector<Entry> Entries() {
  std::vector<Entry> out;
  std::ifstream in("/proc/self/mountinfo");
  for (std::string line; std::getline(in, line);) {
    std::istringstream f(line);
    std::string id, parent, device, root, path, options, field;
    if (!(f >> id >> parent >> device >> root >> path >> options)) continue;
    while (f >> field && field != "-") {
    }
    Entry e{id, parent, device, Unescape(path), "", ""};
    if (!(f >> e.fstype)) continue;
    if (f >> e.source) e.source = Unescape(e.source);
    out.push_back(std::move(e));
  }
  return out;
}

bool IsFuse(const std::string& fstype) { return fstype == "fuse" || fstype.rfind("fuse.", 0) == 0; }

// The device of the topmost mount on `path` among those `fuse_only` admits.
// Mounts stacked on one path each have the one below as their parent; the
// order of the lines does not tell (a mount moved on top with `mount --move`
// keeps its older place), so walk down from the one nothing is stacked on.
// Two such (a stack under a mount that a later mount on a parent hid, and
// a new one on top of that): the table does not say which one the path
// reaches, and the answer is "" (for the daemon: do not unmount by path).
std::string TopDevice(const std::string& path, bool fuse_only) {
  std::vector<Entry> stack;
  for (Entry& e : Entries()) {
    if (e.path == path) stack.push_back(std::move(e));
  }
  auto below = [&](const Entry& e) {
    return std::find_if(stack.begin(), stack.end(), [&](const Entry& b) { return b.id == e.parent; });
  };
  auto is_top = [&](const Entry& e) {
    return std::none_of(stack.begin(), stack.end(), [&](const Entry& above) { return above.parent == e.id; });
  };
  if (std::count_if(stack.begin(), stack.end(), is_top) > 1) return "";
  auto top = std::find_if(stack.begin(), stack.end(), is_top);
  // At most one step per mount: a malformed table cannot loop us.
  for (size_t steps = 0; top != stack.end() && steps < stack.size(); steps++, top = below(*top)) {
    if (!fuse_only || IsFuse(top->fstype)) return top->device;
  }
  return "";
}

}  // namespace

std::string FuseDeviceAt(const std::string& mountpoint) { return TopDevice(mountpoint, /*fuse_only=*/true); }

std::string MountSourceOf(const std::string& device) {
  for (const Entry& e : Entries()) {
    if (e.device == device) return e.source;
  }
  return "";
}

std::string MountPathOf(const std::string& device, const std::string& source) {
  for (const Entry& e : Entries()) {
    if (e.device == device && e.source == source) return e.path;
  }
  return "";
}

std::string TopDeviceAt(const std::string& path) { return TopDevice(path, /*fuse_only=*/false); }

std::string DeferfsMountOf(const std::string& backing) {
  // The mount command names its source by the backing's real path; nothing
  // is stat()ed (a source on a hung filesystem would hang us).
  char* real = realpath(backing.c_str(), nullptr);
  if (real == nullptr) return "";
  const std::string source = real;
  free(real);
  for (const Entry& e : Entries()) {
    if (e.fstype == "fuse.deferfs" && e.source == source) return e.path;
  }
  return "";
}

}  // namespace deferfs
