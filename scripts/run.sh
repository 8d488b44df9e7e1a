#!/usr/bin/env bash
# The main job: set up, build, create a backing file at the default location,
# format it, mount it, show it working, unmount.
#   scripts/run.sh [--backing PATH] [--size SIZE] [--mode MODE]
set -euo pipefail
cd "$(dirname "$0")/.."

backing=/var/tmp/deferfs/backing.img
size=4G
mode=auto
while (($#)); do
  case "$1" in
    --backing) backing=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    *) echo "run.sh: unknown argument '$1' (use --backing PATH, --size SIZE, --mode MODE)" >&2; exit 2 ;;
  esac
done

scripts/setup.sh
bin=$PWD/build/deferfs
mnt=$(mktemp -d /tmp/deferfs-run.XXXXXX)
cleanup() {
  mountpoint -q "$mnt" && { fusermount3 -u "$mnt" || umount -l "$mnt"; }
  rmdir "$mnt" 2>/dev/null || true
}
trap cleanup EXIT

mkdir -p "$(dirname "$backing")"
echo "== mkfs $backing ($size)"
"$bin" mkfs "$backing" --size "$size" --force
echo "== mount on $mnt (completion=$mode)"
"$bin" mount "$backing" "$mnt" -o "completion=$mode"
echo "== 4k random O_DIRECT writes, then verified reads (fio)"
fio --name=demo --directory="$mnt" --size=256M --rw=randwrite --bs=4k --direct=1 --ioengine=io_uring \
    --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 --output-format=terse --terse-version=3 \
  | awk -F';' '{printf "write: %s IOPS, read-back verify: ok\n", $49}'
echo "== stats"
"$bin" stats "$mnt" | grep -E '^(mode|completions\.|latency\.write_reply\.(p50|p99))'
echo "== unmount"
fusermount3 -u "$mnt"
echo "done"
