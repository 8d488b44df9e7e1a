// The deferfs subcommands. mount/main.cc parses the command line (CLI11) into
// these structs; each command validates the values, prints one
// "deferfs: ..." line on error and returns the exit status.
#pragma once

#include <string>
#include <vector>

namespace deferfs {

struct MkfsArgs {
  std::string backing;
  std::string size;  // empty: the device's or file's own size; else bytes with K/M/G/T
  std::string meta;  // empty: derived from the backing path
  bool force = false;
  bool discard = false;  // discard (block device) or punch (file) the data area first
};

struct MountArgs {
  std::string backing;
  std::string mountpoint;
  std::vector<std::string> options;  // each -o string, in order
  bool foreground = false;
};

struct FsckArgs {
  std::string backing;
  std::string meta;  // empty: derived from the backing path
  bool repair = false;
};

struct StatsArgs {
  std::string mountpoint;
  bool json = false;
  bool reset = false;
  bool watch = false;
  unsigned count = 0;  // --watch refreshes; 0: until interrupted
};

int MkfsCommand(const MkfsArgs& args);
int MountCommand(const MountArgs& args);
int StatsCommand(const StatsArgs& args);
int FsckCommand(const FsckArgs& args);

// mount.fuse.deferfs, the helper mount(8) runs for type fuse.deferfs:
// `BACKING MOUNTPOINT [-sfnv] [-o OPTS] [-t TYPE]`.
int MountHelperMain(int argc, char** argv);

// Prints "deferfs: <msg>" on stderr and returns 1, the exit status of every error.
int Fail(const std::string& msg);
// Fail() for a command-line parse error: `what` folded onto one line, then
// where to look for the usage ("deferfs mount", "mount.fuse.deferfs").
int UsageFail(std::string what, const std::string& where);

// Where the metadata store lives unless -o meta / --meta says otherwise:
// next to a backing file, or under /var/lib/deferfs for a block device.
std::string DefaultMetaDir(const std::string& backing, bool is_block_device, const std::string& uuid);

}  // namespace deferfs
