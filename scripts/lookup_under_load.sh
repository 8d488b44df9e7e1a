#!/usr/bin/env bash
# Lookups of uncached inodes while fio makes allocating writes: the latency
# of `stat` on files whose inodes the kernel (and so deferfs) has forgotten,
# which makes deferfs read each inode from its metadata store, against a
# write load whose metadata changes the store holds back (deferred inserts).
# Prints a Markdown row: stat p50/p99/p99.9/max in µs, and fio's IOPS.
#   scripts/lookup_under_load.sh [--mode MODE] [--qd N] [--seconds S] [--backing PATH]
# Default: completion=defer, QD16, 10 s of fio (stats run during the middle
# 7 s, 50 files between drops of the kernel's dentry and inode caches, then
# 20 ms of sleep so that fio keeps most of the CPU),
# /var/tmp/deferfs/lookup-bench.img (3 GiB, written once with O_DIRECT like
# run.sh's backing, reformatted on every run). Builds deferfs first.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=defer
qd=16
seconds=10
backing=/var/tmp/deferfs/lookup-bench.img
while (($#)); do
  case "$1" in
    --mode) mode=$2; shift 2 ;;
    --qd) qd=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --backing) backing=$2; shift 2 ;;
    *) echo "lookup_under_load.sh: unknown argument '$1': see the usage at the top of $0" >&2; exit 2 ;;
  esac
done
if ((seconds < 4)); then
  echo "lookup_under_load.sh: --seconds $seconds is too short: give 4 or more" >&2; exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "lookup_under_load.sh: dropping the kernel's caches needs root: run it with sudo" >&2; exit 2
fi
scripts/setup.sh >&2
bin=build/deferfs

mnt=$(mktemp -d /tmp/deferfs-lookup-bench.XXXXXX)
fio_pid=
cleanup() {
  [ -n "$fio_pid" ] && kill "$fio_pid" 2>/dev/null && wait "$fio_pid" 2>/dev/null
  if mountpoint -q "$mnt"; then fusermount3 -u "$mnt" || umount -l "$mnt"; fi
  rm -f "$mnt.fio.json"
  rmdir "$mnt"
}
trap cleanup EXIT

if [ ! -f "$backing" ] || [ "$(stat -c %s "$backing")" != $((3 << 30)) ]; then
  mkdir -p "$(dirname "$backing")"
  dd if=/dev/zero of="$backing" bs=4M count=768 oflag=direct status=none
fi
"$bin" mkfs "$backing" --force >/dev/null
"$bin" mount "$backing" "$mnt" -o "completion=$mode"
echo "lookup_under_load.sh: completion=$mode, QD$qd, ${seconds} s, on $mnt" >&2

mkdir "$mnt/d"
python3 -c 'import sys
for i in range(400): open(f"{sys.argv[1]}/f{i}", "w").close()' "$mnt/d"
FILE="$mnt/big" SIZE=1G QD=$qd RUNTIME=$seconds fio scripts/fio/randwrite-alloc.fio \
  --output-format=json --output="$mnt.fio.json" &
fio_pid=$!
sleep 1.5

lat=$(python3 - "$mnt/d" "$((seconds - 3))" <<'EOF'
import os, sys, time
d, secs = sys.argv[1], float(sys.argv[2])
lat = []
end = time.monotonic() + secs
while time.monotonic() < end:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")  # dentries and inodes: the kernel forgets them, and so does deferfs
    for i in range(0, 400, 8):
        t = time.perf_counter()
        os.stat(f"{d}/f{i}")
        lat.append((time.perf_counter() - t) * 1e6)
    time.sleep(0.02)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(f"{len(lat)} stats: p50 {q(.5):.0f} µs, p99 {q(.99):.0f} µs, p99.9 {q(.999):.0f} µs, max {lat[-1]:.0f} µs",
      file=sys.stderr)
print(f"{q(.5):.0f} {q(.99):.0f} {q(.999):.0f} {lat[-1]:.0f}")
EOF
)
wait "$fio_pid"
fio_pid=
read -r p50 p99 p999 max <<<"$lat"
iops=$(python3 -c 'import json, sys; print("%.1fk" % (json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"] / 1000))' "$mnt.fio.json")
echo "| mode | stat p50 µs | p99 µs | p99.9 µs | max µs | fio IOPS (allocating writes, QD$qd) |"
echo "|---|---|---|---|---|---|"
echo "| $mode | $p50 | $p99 | $p999 | $max | $iops |"
