// The FUSE layer as issuer of the kiocb contract: READ and WRITE requests
// become kiocbs with IOCB_DIO_DEFER set (a FUSE worker can run completions
// from its own context), and ki_complete either replies from the thread it
// runs on or, when the dio engine set dio_complete, queues the kiocb to the
// issuing worker's task_work. Replies carry dio_complete's result, never a
// raw device result. Callbacks of the FUSE operation table; thread-safe.
#pragma once

#include <fuse_lowlevel.h>

namespace deferfs {

void FuseRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi);
void FuseWrite(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off, fuse_file_info* fi);

}  // namespace deferfs
