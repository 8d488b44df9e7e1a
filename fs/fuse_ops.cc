#include "fs/fuse_ops.h"

#include <fcntl.h>
#include <sys/xattr.h>

#include <algorithm>
#include <string>
#include <vector>

#include "fs/filesystem.h"
#include "fs/fuse_io.h"
#include "fs/stats_ioctl.h"
#include "fs/task_work.h"

namespace deferfs {
namespace {

// All changes go through this mount, so the kernel may cache what we reply.
constexpr double kAttrTimeout = 1.0;
constexpr double kEntryTimeout = 1.0;

Filesystem* Fs(fuse_req_t req) { return static_cast<Filesystem*>(fuse_req_userdata(req)); }

Caller CallerOf(fuse_req_t req) {
  const fuse_ctx* ctx = fuse_req_ctx(req);
  Caller c{ctx->uid, ctx->gid, ctx->umask, nullptr};
  c.in_group = [req](uint32_t gid) {
    gid_t groups[256];
    int n = fuse_req_getgroups(req, 256, groups);
    for (int i = 0; i < n && i < 256; i++) {
      if (groups[i] == gid) return true;
    }
    return false;
  };
  return c;
}

void ReplyErr(fuse_req_t req, const Status& st) { fuse_reply_err(req, st.err()); }

// The kernel never saw the entry (the request was interrupted): it holds no
// lookup reference to forget, so drop the one the operation counted.
void ForgetUnreplied(Filesystem* fs, uint64_t ino) {
  const Forgotten one{ino, 1};
  fs->Forget(std::span(&one, 1));
}

void ReplyEntry(fuse_req_t req, const Status& st, const struct stat& attr) {
  if (!st.ok()) return ReplyErr(req, st);
  fuse_entry_param e{};
  e.ino = attr.st_ino;
  e.attr = attr;
  e.attr_timeout = kAttrTimeout;
  e.entry_timeout = kEntryTimeout;
  Filesystem* fs = Fs(req);  // a reply frees req, sent or not
  if (fuse_reply_entry(req, &e) != 0) ForgetUnreplied(fs, attr.st_ino);
}

void ReplyAttr(fuse_req_t req, const Status& st, const struct stat& attr) {
  if (!st.ok()) return ReplyErr(req, st);
  fuse_reply_attr(req, &attr, kAttrTimeout);
}

void Init(void* userdata, fuse_conn_info* conn) {
  // Splice would bypass our aligned receive buffers.
  conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
  if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
  if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) conn->want |= FUSE_CAP_PARALLEL_DIROPS;
  if (conn->capable & FUSE_CAP_READDIRPLUS) conn->want |= FUSE_CAP_READDIRPLUS;
  if (conn->capable & FUSE_CAP_IOCTL_DIR) conn->want |= FUSE_CAP_IOCTL_DIR;  // deferfs stats
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  // The kernel truncates on open(O_TRUNC) with a SETATTR, and kills suid/sgid
  // bits on write and chown itself: both then follow one code path here.
  conn->want &= ~(FUSE_CAP_ATOMIC_O_TRUNC | FUSE_CAP_HANDLE_KILLPRIV);
  // Keep the application's queue depth: the kernel caps outstanding
  // background (async DIO) requests at max_background.
  conn->max_background = 512;
  conn->congestion_threshold = 384;
  conn->max_write = kMaxIo;
  conn->max_readahead = kMaxIo;
  // libfuse refuses the INIT unless it repeats the mount's max_read=.
  conn->max_read = static_cast<Filesystem*>(userdata)->max_read();
}

Inode* Handle(fuse_file_info* fi) { return reinterpret_cast<Inode*>(fi->fh); }

// An open whose reply did not reach the kernel: it will never release it.
// Takes the Filesystem, not the request: a reply frees the request, even a failed one.
void ReleaseUnreplied(Filesystem* fs, Inode* inode) {
  fs->Release(inode);
  LiveGauges::Down(fs->gauges().open_files);
}

void Lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  struct stat st;
  Status s = Fs(req)->Lookup(parent, name, &st);
  if (s.err() == ENOENT) {
    // A negative entry the kernel may cache: nothing else changes this directory.
    fuse_entry_param e{};
    e.entry_timeout = kEntryTimeout;
    fuse_reply_entry(req, &e);
    return;
  }
  ReplyEntry(req, s, st);
}

void Forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  const Forgotten one{ino, nlookup};
  Fs(req)->Forget(std::span(&one, 1));
  fuse_reply_none(req);
}

void ForgetMulti(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
  // A batch fills the receive buffer (thousands, after an rm -rf). Each
  // chunk is one commit under the namespace lock; between chunks the worker
  // runs its deferred completions, which would otherwise wait for the lot.
  constexpr size_t kChunk = 32;
  for (size_t i = 0; i < count; i += kChunk) {
    Forgotten chunk[kChunk];
    const size_t n = std::min(kChunk, count - i);
    for (size_t k = 0; k < n; k++) chunk[k] = {forgets[i + k].ino, forgets[i + k].nlookup};
    Fs(req)->Forget(std::span(chunk, n));
    TaskWork::Current()->RunPending();
  }
  fuse_reply_none(req);
}

void GetAttr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  struct stat st;
  Status s = Fs(req)->GetAttr(ino, &st);
  ReplyAttr(req, s, st);
}

void SetAttr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info*) {
  SetAttrRequest r;
  r.attr = *attr;
  struct { int fuse; uint32_t ours; } const kMap[] = {
      {FUSE_SET_ATTR_MODE, SetAttrRequest::kMode},           {FUSE_SET_ATTR_UID, SetAttrRequest::kUid},
      {FUSE_SET_ATTR_GID, SetAttrRequest::kGid},             {FUSE_SET_ATTR_SIZE, SetAttrRequest::kSize},
      {FUSE_SET_ATTR_ATIME, SetAttrRequest::kAtime},         {FUSE_SET_ATTR_MTIME, SetAttrRequest::kMtime},
      {FUSE_SET_ATTR_ATIME_NOW, SetAttrRequest::kAtimeNow}, {FUSE_SET_ATTR_MTIME_NOW, SetAttrRequest::kMtimeNow},
      {FUSE_SET_ATTR_CTIME, SetAttrRequest::kCtime},
  };
  for (const auto& m : kMap) {
    if (to_set & m.fuse) r.valid |= m.ours;
  }
  if ((to_set & FUSE_SET_ATTR_SIZE) && static_cast<uint64_t>(attr->st_size) > kMaxFileSize) {
    return ReplyErr(req, Status::Error(EFBIG, "size beyond the largest file"));
  }
  struct stat st;
  Status s = Fs(req)->SetAttr(ino, r, &st);
  ReplyAttr(req, s, st);
}

void ReadLink(fuse_req_t req, fuse_ino_t ino) {
  std::string target;
  Status s = Fs(req)->ReadLink(ino, &target);
  if (!s.ok()) return ReplyErr(req, s);
  fuse_reply_readlink(req, target.c_str());
}

void Mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev) {
  struct stat st;
  Status s = Fs(req)->Mknod(CallerOf(req), parent, name, mode, rdev, &st);
  ReplyEntry(req, s, st);
}

void Mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  struct stat st;
  Status s = Fs(req)->Mkdir(CallerOf(req), parent, name, mode, &st);
  ReplyEntry(req, s, st);
}

void Unlink(fuse_req_t req, fuse_ino_t parent, const char* name) { ReplyErr(req, Fs(req)->Unlink(parent, name)); }
void Rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) { ReplyErr(req, Fs(req)->Rmdir(parent, name)); }

void Symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name) {
  struct stat st;
  Status s = Fs(req)->Symlink(CallerOf(req), parent, name, link, &st);
  ReplyEntry(req, s, st);
}

void Rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent, const char* newname,
            unsigned flags) {
  ReplyErr(req, Fs(req)->Rename(parent, name, newparent, newname, flags));
}

void Link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char* newname) {
  struct stat st;
  Status s = Fs(req)->Link(ino, newparent, newname, &st);
  ReplyEntry(req, s, st);
}

void Open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  // (O_TRUNC comes as a SETATTR: ATOMIC_O_TRUNC is off, see Init.)
  if ((fi->flags & O_ACCMODE) != O_RDONLY && Fs(req)->read_only()) {
    return ReplyErr(req, Status::Error(EROFS, "mounted read-only"));
  }
  Inode* inode;
  Status s = Fs(req)->Open(ino, &inode);
  if (!s.ok()) return ReplyErr(req, s);
  fi->fh = reinterpret_cast<uint64_t>(inode);
  // An O_DIRECT open bypasses the page cache in the kernel as well: no cache
  // invalidation around every request on its path.
  if (fi->flags & O_DIRECT) fi->direct_io = 1;
  // Counted before the reply: the release may run on another worker at once.
  Filesystem* fs = Fs(req);
  LiveGauges::Up(fs->gauges().open_files);
  if (fuse_reply_open(req, fi) != 0) ReleaseUnreplied(fs, inode);  // interrupted: no release will come
}

void Create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi) {
  struct stat st;
  Inode* inode;
  Status s = Fs(req)->Create(CallerOf(req), parent, name, mode, &st, &inode);
  if (!s.ok()) return ReplyErr(req, s);
  fi->fh = reinterpret_cast<uint64_t>(inode);
  if (fi->flags & O_DIRECT) fi->direct_io = 1;
  fuse_entry_param e{};
  e.ino = st.st_ino;
  e.attr = st;
  e.attr_timeout = kAttrTimeout;
  e.entry_timeout = kEntryTimeout;
  Filesystem* fs = Fs(req);
  LiveGauges::Up(fs->gauges().open_files);
  if (fuse_reply_create(req, &e, fi) != 0) {
    ReleaseUnreplied(fs, inode);
    ForgetUnreplied(fs, st.st_ino);
  }
}

void Release(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  Fs(req)->Release(Handle(fi));
  LiveGauges::Down(Fs(req)->gauges().open_files);
  fuse_reply_err(req, 0);
}

void Fsync(fuse_req_t req, fuse_ino_t, int datasync, fuse_file_info* fi) {
  ReplyErr(req, Fs(req)->Fsync(Handle(fi), datasync != 0));
}

void Fallocate(fuse_req_t req, fuse_ino_t, int mode, off_t off, off_t len, fuse_file_info* fi) {
  if (off < 0 || len <= 0) return ReplyErr(req, Status::Invalid("bad range"));
  if (static_cast<uint64_t>(off) + static_cast<uint64_t>(len) > kMaxFileSize) {
    return ReplyErr(req, Status::Error(EFBIG, "range beyond the largest file"));
  }
  ReplyErr(req, Fs(req)->Fallocate(Handle(fi), mode, static_cast<uint64_t>(off), static_cast<uint64_t>(len)));
}

void Lseek(fuse_req_t req, fuse_ino_t, off_t off, int whence, fuse_file_info* fi) {
  if (whence != SEEK_DATA && whence != SEEK_HOLE) return ReplyErr(req, Status::Invalid("bad whence"));
  if (off < 0) return ReplyErr(req, Status::Error(ENXIO, "negative offset"));
  uint64_t at;
  Status s = Fs(req)->Lseek(Handle(fi), static_cast<uint64_t>(off), whence, &at);
  if (!s.ok()) return ReplyErr(req, s);
  fuse_reply_lseek(req, static_cast<off_t>(at));
}

void OpenDir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  struct stat st;
  Status s = Fs(req)->GetAttr(ino, &st);
  if (!s.ok()) return ReplyErr(req, s);
  if (!S_ISDIR(st.st_mode)) return ReplyErr(req, Status::Error(ENOTDIR, "not a directory"));
  fuse_reply_open(req, fi);
}

void ReadDirCommon(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, bool plus) {
  std::vector<char> buf(size);
  size_t used = 0;
  std::vector<uint64_t> counted;  // readdirplus: entries ReadDir counted a lookup for
  Filesystem* fs = Fs(req);       // a reply frees req, sent or not
  Status s = fs->ReadDir(ino, static_cast<uint64_t>(off), plus,
                         [&](std::string_view name, const struct stat& st, uint64_t next) {
                           std::string n(name);
                           size_t need;
                           if (plus) {
                             fuse_entry_param e{};
                             e.ino = st.st_ino;
                             e.attr = st;
                             e.attr_timeout = kAttrTimeout;
                             e.entry_timeout = kEntryTimeout;
                             need = fuse_add_direntry_plus(req, buf.data() + used, size - used, n.c_str(),
                                                           &e, static_cast<off_t>(next));
                           } else {
                             need = fuse_add_direntry(req, buf.data() + used, size - used, n.c_str(), &st,
                                                      static_cast<off_t>(next));
                           }
                           if (need > size - used) return false;
                           used += need;
                           if (plus && name != "." && name != "..") counted.push_back(st.st_ino);
                           return true;
                         });
  // Entries already placed must be returned even if a later one failed.
  if (!s.ok() && used == 0) return ReplyErr(req, s);
  if (fuse_reply_buf(req, buf.data(), used) != 0) {
    for (uint64_t child : counted) ForgetUnreplied(fs, child);
  }
}

void ReadDir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  ReadDirCommon(req, ino, size, off, false);
}
void ReadDirPlus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  ReadDirCommon(req, ino, size, off, true);
}
void ReleaseDir(fuse_req_t req, fuse_ino_t, fuse_file_info*) { fuse_reply_err(req, 0); }
void FsyncDir(fuse_req_t req, fuse_ino_t, int, fuse_file_info*) { ReplyErr(req, Fs(req)->Sync()); }

void StatFs(fuse_req_t req, fuse_ino_t) {
  struct statvfs sv;
  Status s = Fs(req)->StatFs(&sv);
  if (!s.ok()) return ReplyErr(req, s);
  fuse_reply_statfs(req, &sv);
}

void SetXattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size, int flags) {
  ReplyErr(req, Fs(req)->SetXattr(ino, name, std::string_view(value, size), flags));
}

// The size protocol shared by getxattr and listxattr.
void ReplyXattr(fuse_req_t req, const Status& s, const std::string& v, size_t size) {
  if (!s.ok()) return ReplyErr(req, s);
  if (size == 0) return (void)fuse_reply_xattr(req, v.size());
  if (v.size() > size) return (void)fuse_reply_err(req, ERANGE);
  fuse_reply_buf(req, v.data(), v.size());
}

void GetXattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  std::string v;
  Status s = Fs(req)->GetXattr(ino, name, &v);
  ReplyXattr(req, s, v, size);
}

void ListXattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  std::string v;
  Status s = Fs(req)->ListXattr(ino, &v);
  ReplyXattr(req, s, v, size);
}

void RemoveXattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
  ReplyErr(req, Fs(req)->RemoveXattr(ino, name));
}

void Ioctl(fuse_req_t req, fuse_ino_t, unsigned int cmd, void*, fuse_file_info*, unsigned flags, const void*,
           size_t, size_t out_size) {
  if (flags & FUSE_IOCTL_COMPAT) return ReplyErr(req, Status::Error(ENOSYS, "32-bit ioctl"));
  if (cmd != kIocStats && cmd != kIocStatsReset) return ReplyErr(req, Status::Error(ENOTTY, "unknown ioctl"));
  bool reset = cmd == kIocStatsReset;
  if (reset && fuse_req_ctx(req)->uid != 0) return ReplyErr(req, Status::Error(EPERM, "only root resets stats"));
  std::string json = Fs(req)->StatsJson(reset, out_size);  // fits with its NUL, histograms permitting
  if (json.size() + 1 > out_size) return ReplyErr(req, Status::Error(ERANGE, "stats too large"));
  fuse_reply_ioctl(req, 0, json.c_str(), json.size() + 1);
}

fuse_lowlevel_ops MakeOps() {
  fuse_lowlevel_ops ops{};
  ops.init = Init;
  ops.lookup = Lookup;
  ops.forget = Forget;
  ops.forget_multi = ForgetMulti;
  ops.getattr = GetAttr;
  ops.setattr = SetAttr;
  ops.readlink = ReadLink;
  ops.mknod = Mknod;
  ops.mkdir = Mkdir;
  ops.unlink = Unlink;
  ops.rmdir = Rmdir;
  ops.symlink = Symlink;
  ops.rename = Rename;
  ops.link = Link;
  ops.open = Open;
  ops.create = Create;
  ops.release = Release;
  ops.read = FuseRead;
  ops.write = FuseWrite;
  ops.fallocate = Fallocate;
  ops.lseek = Lseek;
  ops.ioctl = Ioctl;
  // No flush: a close has nothing of ours to write back or report (writes
  // reach the device before they are answered). The first FLUSH gets ENOSYS
  // and the kernel sends no more (fc->no_flush): a round trip less per close.
  ops.fsync = Fsync;
  ops.opendir = OpenDir;
  ops.readdir = ReadDir;
  ops.readdirplus = ReadDirPlus;
  ops.releasedir = ReleaseDir;
  ops.fsyncdir = FsyncDir;
  ops.statfs = StatFs;
  ops.setxattr = SetXattr;
  ops.getxattr = GetXattr;
  ops.listxattr = ListXattr;
  ops.removexattr = RemoveXattr;
  return ops;
}

}  // namespace

const fuse_lowlevel_ops& FuseOps() {
  static const fuse_lowlevel_ops ops = MakeOps();
  return ops;
}

}  // namespace deferfs
