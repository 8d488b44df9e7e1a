// Installation: `cmake --install` into a temporary root puts the binary, the
// mount(8) helper and the man page in place, and the helper runs as the
// helper; `cpack` builds a .deb that declares its dependencies.
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/mount/mounted_fs.h"

#ifndef DEFERFS_BUILD_DIR
#error "DEFERFS_BUILD_DIR, DEFERFS_CMAKE and DEFERFS_CPACK must be defined"
#endif

namespace deferfs_test {
namespace {

using namespace std::chrono_literals;

bool OnPath(const std::string& prog) { return RunCommand({"sh", "-c", "command -v " + prog}).succeeded(); }

// `cmake --install BUILD --prefix /usr` with DESTDIR=root.
::testing::AssertionResult InstallInto(const std::string& root) {
  RunResult r = RunCommand({"env", "DESTDIR=" + root, DEFERFS_CMAKE, "--install", DEFERFS_BUILD_DIR, "--prefix", "/usr"});
  if (!r.succeeded()) return ::testing::AssertionFailure() << "cmake --install failed: " << r.Describe();
  return ::testing::AssertionSuccess();
}

// The -o option names `deferfs mount --help` lists ("  workers=N  ..." -> "workers=").
std::vector<std::string> MountOptionNames() {
  RunResult r = RunDeferfs({"mount", "--help"});
  std::vector<std::string> names;
  std::istringstream in(r.out);
  bool in_list = false;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("Mount options", 0) == 0) in_list = true;
    if (!in_list || line.size() < 3 || line[0] != ' ' || line[2] == ' ') continue;
    std::string word = line.substr(2, line.find_first_of(" ,=", 2) - 2);
    if (line.find('=') == 2 + word.size()) word += "=";
    names.push_back(word);
  }
  return names;
}

// The subcommands `deferfs --help` lists.
std::vector<std::string> CommandNames() {
  RunResult r = RunDeferfs({"--help"});
  std::vector<std::string> names;
  std::istringstream in(r.out);
  bool in_list = false;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("Subcommands:", 0) == 0) {
      in_list = true;
      continue;
    }
    if (line.empty()) in_list = false;
    if (!in_list) continue;
    std::istringstream is(line);
    std::string name;
    is >> name;
    names.push_back(name);
  }
  return names;
}

TEST(InstallTest, InstallsBinaryHelperAndManPage) {
  TempDir root("/tmp", "deferfs-install");
  ASSERT_TRUE(InstallInto(root.path()));
  const std::string sbin = root / "usr/sbin";
  const std::string bin = sbin + "/deferfs", helper = sbin + "/mount.fuse.deferfs";
  EXPECT_EQ(access(bin.c_str(), X_OK), 0) << bin << ": " << strerror(errno);

  // The helper is a relative symlink, so it resolves to the installed binary
  // wherever the root is, and mount(8) runs it by that name.
  std::error_code ec;
  EXPECT_TRUE(std::filesystem::is_symlink(helper, ec)) << helper;
  EXPECT_EQ(std::filesystem::read_symlink(helper, ec).string(), "deferfs");
  EXPECT_EQ(std::filesystem::canonical(helper, ec), std::filesystem::canonical(bin, ec));

  RunResult v = RunCommand({helper, "--version"});
  ASSERT_TRUE(v.succeeded()) << v.Describe();
  EXPECT_EQ(v.out.rfind("deferfs ", 0), 0u) << v.out;
  RunResult h = RunCommand({helper, "--help"});
  ASSERT_TRUE(h.succeeded()) << h.Describe();
  EXPECT_NE(h.out.find("Usage: mount.fuse.deferfs"), std::string::npos) << "not the helper's usage:\n" << h.out;
  // mount(8)'s fake mount (-f) checks the options without mounting.
  RunResult fake = RunCommand({helper, "/nonexistent.img", "/nonexistent", "-f", "-o", "rw,completion=defer,noauto"});
  EXPECT_TRUE(fake.succeeded()) << fake.Describe();
  RunResult bad = RunCommand({helper, "/nonexistent.img", "/nonexistent", "-f", "-o", "completion=fast"});
  EXPECT_FALSE(bad.succeeded());
  EXPECT_NE(bad.err.find("completion"), std::string::npos) << bad.Describe();

  // Gzipped, as Debian's policy wants it; the helper's page is a link to it.
  const std::string man = root / "usr/share/man/man8/deferfs.8.gz";
  RunResult unzipped = RunCommand({"gzip", "-dc", man});
  ASSERT_TRUE(unzipped.succeeded()) << man << ": " << unzipped.Describe();
  const std::string page = unzipped.out;
  ASSERT_FALSE(page.empty()) << man << " is empty";
  char link[64] = {};
  const std::string helper_page = root / "usr/share/man/man8/mount.fuse.deferfs.8.gz";
  EXPECT_GT(readlink(helper_page.c_str(), link, sizeof(link) - 1), 0) << helper_page << ": " << strerror(errno);
  EXPECT_STREQ(link, "deferfs.8.gz");
  for (const char* section : {"NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "MOUNT OPTIONS", "COMPLETION MODES",
                              "STATS", "FILES", "EXIT STATUS", "EXAMPLES", "SEE ALSO"}) {
    EXPECT_NE(page.find(std::string(".SH ") + section), std::string::npos) << "man page lacks " << section;
  }
  // Every command and every mount option the binary accepts is documented.
  std::vector<std::string> commands = CommandNames();
  EXPECT_GE(commands.size(), 3u) << "could not read the commands from 'deferfs --help'";
  for (const std::string& cmd : commands) {
    EXPECT_NE(page.find(".B deferfs " + cmd + "\n"), std::string::npos) << "SYNOPSIS lacks " << cmd;
    EXPECT_NE(page.find(".BI \"" + cmd + " "), std::string::npos) << "COMMANDS lacks " << cmd;
  }
  std::vector<std::string> names = MountOptionNames();
  EXPECT_GE(names.size(), 8u) << "could not read the options from 'deferfs mount --help'";
  for (const std::string& name : names) {
    std::string escaped;  // roff writes - as \-
    for (char c : name) escaped += c == '-' ? std::string("\\-") : std::string(1, c);
    EXPECT_NE(page.find(escaped), std::string::npos) << "man page does not document mount option " << name;
  }
  if (OnPath("groff")) {
    const std::string unzipped_man = root / "deferfs.8";
    {
      std::ofstream out(unzipped_man);
      out << page;
    }
    RunResult g = RunCommand({"groff", "-man", "-t", "-Tutf8", "-ww", "-z", unzipped_man});
    EXPECT_TRUE(g.succeeded()) << g.Describe();
    EXPECT_EQ(g.err, "") << "groff warnings in the man page";
  }
}

TEST(InstallTest, DebPackageDeclaresDependenciesAndContents) {
  if (!OnPath("dpkg-deb") || !OnPath("dpkg-shlibdeps")) GTEST_SKIP() << "needs dpkg-dev";
  TempDir out("/tmp", "deferfs-cpack");
  RunResult r = RunCommand(
      {DEFERFS_CPACK, "-G", "DEB", "-B", out.path(), "--config", std::string(DEFERFS_BUILD_DIR) + "/CPackConfig.cmake"},
      600s);
  ASSERT_TRUE(r.succeeded()) << r.Describe();
  std::string deb;
  for (const auto& e : std::filesystem::directory_iterator(out.path())) {
    if (e.path().extension() == ".deb") deb = e.path();
  }
  ASSERT_FALSE(deb.empty()) << "cpack made no .deb: " << r.Describe();

  RunResult f = RunCommand({"dpkg-deb", "-f", deb, "Package", "Version", "Depends", "Maintainer", "Description"});
  ASSERT_TRUE(f.succeeded()) << f.Describe();
  EXPECT_NE(f.out.find("Package: deferfs\n"), std::string::npos) << f.out;
  EXPECT_NE(f.out.find("Maintainer: "), std::string::npos) << f.out;
  for (const char* dep : {"libfuse3-3", "liburing2", "librocksdb", "libstdc++6", "libc6", "fuse3"}) {
    EXPECT_NE(f.out.find(dep), std::string::npos) << "Depends lacks " << dep << ":\n" << f.out;
  }
  RunResult c = RunCommand({"dpkg-deb", "-c", deb});
  ASSERT_TRUE(c.succeeded()) << c.Describe();
  EXPECT_NE(c.out.find("./usr/sbin/deferfs\n"), std::string::npos) << c.out;
  EXPECT_NE(c.out.find("./usr/sbin/mount.fuse.deferfs -> deferfs"), std::string::npos) << c.out;
  EXPECT_NE(c.out.find("./usr/share/man/man8/deferfs.8.gz\n"), std::string::npos) << c.out;
  EXPECT_NE(c.out.find("./usr/share/man/man8/mount.fuse.deferfs.8.gz -> deferfs.8.gz"), std::string::npos) << c.out;
  EXPECT_NE(c.out.find("./var/lib/deferfs/\n"), std::string::npos) << "the package does not own it:\n" << c.out;
  EXPECT_EQ(c.out.find("test"), std::string::npos) << "tests must not be packaged:\n" << c.out;
}

}  // namespace
}  // namespace deferfs_test
