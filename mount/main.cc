// deferfs: the command. Dispatches to the subcommands.
#include <cstdio>
#include <cstring>
#include <string>

#include "mount/commands.h"

namespace deferfs {

int Fail(const std::string& msg) {
  std::fprintf(stderr, "deferfs: %s\n", msg.c_str());
  return 1;
}

std::string DefaultMetaDir(const std::string& backing, bool is_block_device, const std::string& uuid) {
  if (is_block_device) return "/var/lib/deferfs/" + uuid;
  return backing + ".meta";
}

namespace {

constexpr char kUsage[] =
    "usage: deferfs <command> [args]\n"
    "\n"
    "commands:\n"
    "  mkfs BACKING [--size SIZE] [--meta DIR] [--force]   format a backing file or block device\n"
    "  mount BACKING MOUNTPOINT [-o OPTS] [-f]             mount it (see 'deferfs mount --help')\n"
    "  stats MOUNTPOINT [--json] [--reset]                 a live mount's completion paths and latencies\n"
    "\n"
    "  --help       this text\n"
    "  --version    the version\n";

}  // namespace
}  // namespace deferfs

int main(int argc, char** argv) {
  using namespace deferfs;
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 1;
  }
  std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (cmd == "--version") {
    std::printf("deferfs %s\n", DEFERFS_VERSION);
    return 0;
  }
  if (cmd == "mkfs") return MkfsCommand(argc - 1, argv + 1);
  if (cmd == "mount") return MountCommand(argc - 1, argv + 1);
  if (cmd == "stats") return StatsCommand(argc - 1, argv + 1);
  return Fail("unknown command '" + cmd + "': run 'deferfs --help' for the list");
}
