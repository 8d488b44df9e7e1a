// The deferfs subcommands. Each takes its own argv (argv[0] is the
// subcommand), prints one "deferfs: ..." line on error and returns the exit status.
#pragma once

#include <string>

namespace deferfs {

int MkfsCommand(int argc, char** argv);
int MountCommand(int argc, char** argv);
int StatsCommand(int argc, char** argv);

// Prints "deferfs: <msg>" on stderr and returns 1, the exit status of every error.
int Fail(const std::string& msg);

// Where the metadata store lives unless -o meta / --meta says otherwise:
// next to a backing file, or under /var/lib/deferfs for a block device.
std::string DefaultMetaDir(const std::string& backing, bool is_block_device, const std::string& uuid);

}  // namespace deferfs
