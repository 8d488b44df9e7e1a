#!/usr/bin/env bash
# Metadata operations on a mounted deferfs, one after another from each of
# JOBS processes (one, by default), as a user's tree walk or `rm -rf` issues
# them: create, stat, rename and unlink of N empty files (split between the
# processes, each in its own directory), then the same again (a second round
# must cost what the first did: nothing the first left behind, such as
# delete tombstones, may slow it). Prints a Markdown table of microseconds
# per operation (of wall time: with several processes, their throughput).
#   scripts/metadata_bench.sh [--files N] [--jobs J] [--mode MODE]
#                             [--options OPTS] [--backing PATH]
# Default: 20000 files, 1 job, completion=auto, no other mount options
# (--options dirsync, say, adds them), /var/tmp/deferfs/meta-bench.img
# (256 MiB, reformatted on every run). Builds deferfs first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

files=20000
jobs=1
mode=auto
options=
backing=/var/tmp/deferfs/meta-bench.img
while (($#)); do
  case "$1" in
    --files) files=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --options) options=$2; shift 2 ;;
    --backing) backing=$2; shift 2 ;;
    *) echo "metadata_bench.sh: unknown argument '$1': see the usage at the top of $0" >&2; exit 2 ;;
  esac
done
if ! [[ $jobs =~ ^[1-9][0-9]*$ && $files =~ ^[0-9]+$ ]] || ((jobs > files)); then
  echo "metadata_bench.sh: --jobs must be 1 to --files ($files), --files a number" >&2
  exit 2
fi
scripts/setup.sh >&2
bin=build/deferfs

mnt=$(mktemp -d /tmp/deferfs-meta-bench.XXXXXX)
cleanup() {
  if mountpoint -q "$mnt"; then fusermount3 -u "$mnt" || umount -l "$mnt"; fi
  rmdir "$mnt"
}
trap cleanup EXIT

mkdir -p "$(dirname "$backing")"
"$bin" mkfs "$backing" --size 256M --force >/dev/null
"$bin" mount "$backing" "$mnt" -o "completion=$mode${options:+,$options}"
echo "metadata_bench.sh: $files files, $jobs job(s), -o completion=$mode${options:+,$options}, on $mnt" >&2

python3 - "$mnt" "$files" "$jobs" <<'EOF'
import multiprocessing, os, queue, sys, time
mp = multiprocessing.get_context("fork")  # job() lives in a script read from stdin
root, n, jobs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ops = ("create", "stat", "rename", "unlink")
each = n // jobs

def job(d, barrier, out):
    names = [os.path.join(d, f"f{i:06d}") for i in range(each)]
    spans = {}
    try:
        for op in ops:
            barrier.wait()  # the jobs start each operation together
            t = time.monotonic()
            for p in names:
                if op == "create":
                    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
                elif op == "stat":
                    os.stat(p)
                elif op == "rename":
                    os.rename(p, p + ".r")
                else:
                    os.unlink(p + ".r")
            spans[op] = (t, time.monotonic())
    except BaseException:
        barrier.abort()  # the others stop too, rather than wait for this one
        out.put(None)
        raise
    out.put(spans)

rows = []
for rnd in (1, 2):
    top = os.path.join(root, f"round{rnd}")
    dirs = [os.path.join(top, f"job{j}") for j in range(jobs)]
    for d in dirs:
        os.makedirs(d)
    barrier, out = mp.Barrier(jobs), mp.Queue()
    procs = [mp.Process(target=job, args=(d, barrier, out)) for d in dirs]
    for p in procs:
        p.start()
    spans = []
    while len(spans) < jobs:
        try:
            spans.append(out.get(timeout=1))
        except queue.Empty:
            # A job killed by a signal reports nothing: stop the rest (not
            # through the barrier, whose lock the dead job may have held).
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.terminate()
                    p.join()
                sys.exit(f"metadata_bench.sh: a job died (exit status {dead[0]}; negative: killed by that signal)")
    for p in procs:
        p.join()
    if None in spans:
        sys.exit("metadata_bench.sh: a job failed (its error is above)")
    for d in dirs:
        os.rmdir(d)
    os.rmdir(top)
    # Wall time of each operation: the first job's start to the last one's end.
    rows.append([(max(s[o][1] for s in spans) - min(s[o][0] for s in spans)) * 1e6 / (each * jobs) for o in ops])
    print(f"round {rnd}: " + ", ".join(f"{o} {v:.0f} µs" for o, v in zip(ops, rows[-1])), file=sys.stderr)
label = f"{each * jobs} files" + (f", {jobs} jobs" if jobs > 1 else "")
print(f"| round ({label}) | " + " | ".join(f"{o} µs" for o in ops) + " |")
print("|---|" + "---|" * len(ops))
for rnd, row in enumerate(rows, 1):
    print(f"| {rnd} | " + " | ".join(f"{v:.0f}" for v in row) + " |")
EOF
