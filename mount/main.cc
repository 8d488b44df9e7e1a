// deferfs: the command. Parses the command line with CLI11 into the
// subcommands' argument structs; as mount.fuse.deferfs it is mount(8)'s helper.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstring>
#include <string>

#include "mount/commands.h"
#include "mount/options.h"

namespace deferfs {

int Fail(const std::string& msg) {
  std::fprintf(stderr, "deferfs: %s\n", msg.c_str());
  return 1;
}

int UsageFail(std::string what, const std::string& where) {
  for (char& c : what) {
    if (c == '\n') c = ' ';
  }
  while (!what.empty() && what.back() == ' ') what.pop_back();
  return Fail(what + ": see '" + where + " --help'");
}

std::string DefaultMetaDir(const std::string& backing, bool is_block_device, const std::string& uuid) {
  if (is_block_device) return "/var/lib/deferfs/" + uuid;
  return backing + ".meta";
}

namespace {

constexpr char kMountHelperName[] = "mount.fuse.deferfs";

// CLI11's message, with the (sub)command the user ran.
int ParseFailure(const CLI::App& app, const CLI::ParseError& e) {
  std::string where = "deferfs";
  for (const CLI::App* sub : app.get_subcommands()) where += " " + sub->get_name();
  return UsageFail(e.what(), where);
}

}  // namespace

int Main(int argc, char** argv) {
  const char* base = strrchr(argv[0], '/');
  if (std::strcmp(base ? base + 1 : argv[0], kMountHelperName) == 0) return MountHelperMain(argc, argv);
  // mount.fuse3's own form, `mount -t fuse deferfs#BACKING MOUNTPOINT` (and
  // fstab lines of type fuse), runs `deferfs BACKING MOUNTPOINT -o OPTS`: a
  // path where a command goes. No command name holds a '/'.
  if (argc >= 3 && argv[1][0] != '-' && std::strchr(argv[1], '/') != nullptr) return MountHelperMain(argc, argv);

  CLI::App app("deferfs: a FUSE filesystem for O_DIRECT IO that studies who runs async DIO completions.",
               "deferfs");
  app.set_version_flag("--version", std::string("deferfs ") + DEFERFS_VERSION, "print the version and exit");
  app.set_help_all_flag("--help-all", "print the help of every command");
  app.require_subcommand(1);
  app.footer("Run 'deferfs COMMAND --help' for a command's options; man deferfs for more.");

  MkfsArgs mkfs;
  CLI::App* mkfs_cmd = app.add_subcommand("mkfs", "format a backing file or block device");
  mkfs_cmd->add_option("BACKING", mkfs.backing, "backing file or block device")->required();
  mkfs_cmd->add_option("--size", mkfs.size,
                       "size with an optional K, M, G or T suffix; creates or resizes a backing file "
                       "(default: the existing file's or device's size)")
      ->type_name("SIZE");
  mkfs_cmd->add_option("--meta", mkfs.meta,
                       "metadata directory (default: BACKING.meta, or /var/lib/deferfs/UUID for a block device)")
      ->type_name("DIR");
  mkfs_cmd->add_flag("--force", mkfs.force, "overwrite an existing deferfs and its metadata directory");
  mkfs_cmd->add_flag("--discard", mkfs.discard,
                     "discard a block device's blocks (punch a file's) before formatting (default: off)");

  MountArgs mount;
  CLI::App* mount_cmd = app.add_subcommand("mount", "mount a formatted backing device");
  mount_cmd->add_option("BACKING", mount.backing, "backing file or block device")->required();
  mount_cmd->add_option("MOUNTPOINT", mount.mountpoint, "an existing directory")->required();
  mount_cmd->add_option("-o", mount.options, "mount options, see below (may be repeated)")
      ->type_name("OPTS")
      ->allow_extra_args(false);
  mount_cmd->add_flag("-f,--foreground", mount.foreground,
                      "stay in the foreground and log to stderr (default: daemonize, log to syslog)");
  mount_cmd->footer(MountOptionsHelp());

  StatsArgs stats;
  CLI::App* stats_cmd = app.add_subcommand("stats", "a live mount's completion paths, wakeups and latencies");
  stats_cmd->add_option("MOUNTPOINT", stats.mountpoint, "a mounted deferfs")->required();
  stats_cmd->add_flag("--json", stats.json, "one JSON object, for scripts (default: a table)");
  stats_cmd->add_flag("--reset", stats.reset,
                      "start counting anew after printing (root only); with --watch: every interval");
  stats_cmd->add_flag("--watch", stats.watch, "refresh every second with per-second rates, until interrupted");
  stats_cmd->add_option("--count", stats.count, "with --watch: stop after N refreshes (0: never)")
      ->type_name("N")
      ->capture_default_str()
      ->check([](const std::string& v) {
        return !v.empty() && v.find_first_not_of("0123456789") == std::string::npos
                   ? std::string()
                   : "'" + v + "' is not a whole number of refreshes (0: no limit)";
      });

  FsckArgs fsck;
  CLI::App* fsck_cmd = app.add_subcommand("fsck", "check an unmounted filesystem offline; fix it with --repair");
  fsck_cmd->add_option("BACKING", fsck.backing, "backing file or block device")->required();
  fsck_cmd->add_option("--meta", fsck.meta,
                       "metadata directory (default: BACKING.meta, or /var/lib/deferfs/UUID for a block device)")
      ->type_name("DIR");
  fsck_cmd->add_flag("--repair", fsck.repair,
                     "fix what is safe: leaked records and blocks, orphans, link counts, dangling entries, readdir "
                     "cookies, the inode counter; unreachable inodes go to /lost+found (default: check only)");
  fsck_cmd->footer("Exit status 0 when clean (or when --repair fixed everything found), 1 otherwise.");

  // A misspelt command is the likeliest mistake: say so rather than CLI11's
  // "argument was not expected".
  if (argc >= 2 && argv[1][0] != '-' && std::strcmp(argv[1], "help") != 0) {
    bool known = !app.get_subcommands([&](const CLI::App* sub) { return sub->get_name() == argv[1]; }).empty();
    if (!known) return Fail(std::string("unknown command '") + argv[1] + "': run 'deferfs --help' for the list");
  }
  if (argc == 2 && std::strcmp(argv[1], "help") == 0) {
    std::fputs(app.help().c_str(), stdout);
    return 0;
  }
  if (argc == 1) return Fail("no command given: run 'deferfs --help' for the list");
  if (argv[1][0] == '-') {
    bool known = false;
    for (const char* o : {"-h", "--help", "--help-all", "--version"}) known |= std::strcmp(argv[1], o) == 0;
    if (!known) return Fail(std::string("unknown option '") + argv[1] + "': run 'deferfs --help'");
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help, --help-all and --version arrive as ParseErrors that exit 0.
    if (e.get_exit_code() == 0) return app.exit(e);
    return ParseFailure(app, e);
  }
  if (mkfs_cmd->parsed()) return MkfsCommand(mkfs);
  if (mount_cmd->parsed()) return MountCommand(mount);
  if (stats_cmd->parsed()) return StatsCommand(stats);
  if (fsck_cmd->parsed()) return FsckCommand(fsck);
  return Fail("no command given: run 'deferfs --help' for the list");
}

}  // namespace deferfs

int main(int argc, char** argv) { return deferfs::Main(argc, argv); }
