#!/usr/bin/env bash
# Metadata operations on a mounted deferfs, one after another from one
# process, as a user's tree walk or `rm -rf` issues them: create, stat,
# rename and unlink of N empty files in one directory, then the same again
# (a second round must cost what the first did: nothing the first left
# behind, such as delete tombstones, may slow it). Prints a Markdown table of
# microseconds per operation.
#   scripts/metadata_bench.sh [--files N] [--mode MODE] [--backing PATH]
# Default: 20000 files, completion=auto, /var/tmp/deferfs/meta-bench.img
# (256 MiB, reformatted on every run). Builds deferfs first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

files=20000
mode=auto
backing=/var/tmp/deferfs/meta-bench.img
while (($#)); do
  case "$1" in
    --files) files=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --backing) backing=$2; shift 2 ;;
    *) echo "metadata_bench.sh: unknown argument '$1': see the usage at the top of $0" >&2; exit 2 ;;
  esac
done
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
"$bin" mount "$backing" "$mnt" -o "completion=$mode"
echo "metadata_bench.sh: $files files, completion=$mode, on $mnt" >&2

python3 - "$mnt" "$files" <<'EOF'
import os, sys, time
root, n = sys.argv[1], int(sys.argv[2])
ops = ("create", "stat", "rename", "unlink")
rows = []
for rnd in (1, 2):
    d = os.path.join(root, f"round{rnd}")
    os.mkdir(d)
    names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
    us = {}
    t = time.perf_counter()
    for p in names:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    us["create"] = time.perf_counter() - t
    t = time.perf_counter()
    for p in names:
        os.stat(p)
    us["stat"] = time.perf_counter() - t
    t = time.perf_counter()
    for p in names:
        os.rename(p, p + ".r")
    us["rename"] = time.perf_counter() - t
    t = time.perf_counter()
    for p in names:
        os.unlink(p + ".r")
    us["unlink"] = time.perf_counter() - t
    os.rmdir(d)
    rows.append([us[o] * 1e6 / n for o in ops])
    print(f"round {rnd}: " + ", ".join(f"{o} {v:.0f} µs" for o, v in zip(ops, rows[-1])), file=sys.stderr)
print(f"| round ({n} files) | " + " | ".join(f"{o} µs" for o in ops) + " |")
print("|---|" + "---|" * len(ops))
for rnd, row in enumerate(rows, 1):
    print(f"| {rnd} | " + " | ".join(f"{v:.0f}" for v in row) + " |")
EOF
