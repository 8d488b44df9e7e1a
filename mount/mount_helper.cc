// mount.fuse.deferfs: what mount(8) runs for `mount -t fuse.deferfs` and for
// fstab lines of that type (a symlink to deferfs; main() dispatches on
// argv[0]). It takes mount(8)'s helper convention,
//   mount.fuse.deferfs BACKING MOUNTPOINT [-sfnv] [-o OPTS] [-t TYPE]
// and runs `deferfs mount` in the background with the same -o options.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>
#include <vector>

#include "mount/commands.h"
#include "mount/options.h"

namespace deferfs {

int MountHelperMain(int argc, char** argv) {
  CLI::App app("mount(8) helper for deferfs: mounts BACKING on MOUNTPOINT like 'deferfs mount'.",
               "mount.fuse.deferfs");
  app.set_version_flag("--version", std::string("deferfs ") + DEFERFS_VERSION, "print the version and exit");
  MountArgs mount;
  bool sloppy = false, fake = false, no_mtab = false, verbose = false;
  std::string type;
  app.add_option("BACKING", mount.backing, "backing file or block device")->required();
  app.add_option("MOUNTPOINT", mount.mountpoint, "an existing directory")->required();
  app.add_option("-o", mount.options, "mount options, as for 'deferfs mount'")->type_name("OPTS")->allow_extra_args(false);
  app.add_flag("-s", sloppy, "sloppy: accepted for mount(8); unknown options still fail");
  app.add_flag("-f", fake, "fake: check the options, do not mount");
  app.add_flag("-n", no_mtab, "no mtab: accepted (the mount table is /proc/self/mounts)");
  app.add_flag("-v", verbose, "print what is mounted");
  app.add_option("-t", type, "file system type: fuse.deferfs");
  app.footer(MountOptionsHelp());
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help, --help-all and --version arrive as ParseErrors that exit 0.
    if (e.get_exit_code() == 0) return app.exit(e);
    return UsageFail(e.what(), "mount.fuse.deferfs");
  }
  if (!type.empty() && type != "fuse.deferfs" && type != "deferfs") {
    return Fail("mount.fuse.deferfs cannot mount type '" + type + "': it mounts fuse.deferfs");
  }
  MountOptions check;
  for (const std::string& o : mount.options) {
    Status s = ParseMountOptions(o, &check);
    if (!s.ok()) return Fail(s.message());
  }
  if (Status s = CheckMountOptions(check); !s.ok()) return Fail(s.message());
  if (verbose) {
    std::string opts;
    for (const std::string& o : mount.options) opts += (opts.empty() ? "" : ",") + o;
    std::fprintf(stderr, "deferfs: mounting %s on %s (%s)\n", mount.backing.c_str(), mount.mountpoint.c_str(),
                 opts.empty() ? "no options" : opts.c_str());
  }
  if (fake) return 0;
  return MountCommand(mount);
}

}  // namespace deferfs
