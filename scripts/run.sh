#!/usr/bin/env bash
# The completion-mode comparison: for each mode, mount deferfs on a pre-written
# backing file and run the fio matrix (scripts/fio/*.fio at queue depths
# 1..32); run the same matrix on the backing file itself first (the physical
# limit). Writes results/<stamp>/{results.csv,results.md,plot.png} and prints
# the Markdown tables.
#   scripts/run.sh [--quick] [--modes "defer workqueue ..."] [--backing PATH]
#                  [--size SIZE] [--runtime SECONDS]
# Default: the five modes, queue depths 1-32, 4 s per run (about ten
# minutes); --quick: queue depths 1 and 16 at 2 s (about three).
set -euo pipefail
cd "$(dirname "$0")/.."

modes="inline workqueue defer auto sync"
qds="1 2 4 8 16 32"
runtime=4
backing=/var/tmp/deferfs/bench.img
size=4G
while (($#)); do
  case "$1" in
    --quick) qds="1 16"; runtime=2; shift ;;
    --modes) modes=$2; shift 2 ;;
    --backing) backing=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    *) echo "run.sh: unknown argument '$1' (see the header of scripts/run.sh)" >&2; exit 2 ;;
  esac
done

scripts/setup.sh
bin=$PWD/build/deferfs
out=results/$(date +%Y%m%d-%H%M%S)
mkdir -p "$out/json"
mnt=$(mktemp -d /tmp/deferfs-bench.XXXXXX)
cleanup() {
  mountpoint -q "$mnt" && { fusermount3 -u "$mnt" || umount -l "$mnt"; }
  rmdir "$mnt" 2>/dev/null || true
}
trap cleanup EXIT

# umount returns before the daemon has exited; it holds the backing's flock
# until then, so wait for that before the next mkfs.
unmount() {
  fusermount3 -u "$mnt"
  for _ in $(seq 300); do flock -n "$backing" true && return 0; sleep 0.1; done
  echo "run.sh: the deferfs daemon did not exit after unmount" >&2; return 1
}

# The backing file is written once with O_DIRECT, so the host filesystem has
# no unwritten extents under it (they would be converted on our first writes).
bytes=$(numfmt --from=iec "$size")
if [ ! -f "$backing" ] || [ "$(stat -c %s "$backing")" != "$bytes" ] || [ ! -f "$backing.prewritten" ]; then
  echo "== pre-writing $backing ($size)"
  mkdir -p "$(dirname "$backing")"
  rm -f "$backing.prewritten"
  dd_status=none; [ -t 2 ] && dd_status=progress  # a progress line on a terminal only
  dd if=/dev/zero of="$backing" bs=4M count=$((bytes / 4194304)) oflag=direct status=$dd_status
  touch "$backing.prewritten"
fi
fsize=$((bytes / 4 / 1048576))M  # each workload file: a quarter of the device

run() {  # run WORKLOAD TARGET FILE QD
  local job=$1 target=$2 file=$3 qd=$4
  local json=$out/json/$target-$job-qd$qd.json
  FILE=$file SIZE=$fsize QD=$qd RUNTIME=$runtime fio --output-format=json --output="$json" "scripts/fio/$job.fio"
  python3 scripts/bench_report.py --brief "$json"
}

total=$(( ($(wc -w <<<"$modes") + 1) ))
n=0
echo "== raw backing file ($((++n))/$total)"
for qd in $qds; do
  for job in randwrite-overwrite randread randwrite-dsync; do
    printf '  raw %-20s qd=%-3s ' "$job" "$qd"; run "$job" raw "$backing" "$qd"
  done
done

for mode in $modes; do
  echo "== completion=$mode ($((++n))/$total)"
  "$bin" mkfs "$backing" --force >/dev/null
  "$bin" mount "$backing" "$mnt" -o "completion=$mode"
  dd if=/dev/zero of="$mnt/written" bs=1M count=$((bytes / 4 / 1048576)) oflag=direct status=none
  for qd in $qds; do
    printf '  %-9s %-20s qd=%-3s ' "$mode" randwrite-alloc "$qd"
    run randwrite-alloc "$mode" "$mnt/alloc-$qd" "$qd"
    rm -f "$mnt/alloc-$qd"
    sync -f "$mnt"  # freed blocks are reusable after a metadata sync
    for job in randwrite-overwrite randread randwrite-dsync; do
      printf '  %-9s %-20s qd=%-3s ' "$mode" "$job" "$qd"; run "$job" "$mode" "$mnt/written" "$qd"
    done
  done
  "$bin" stats "$mnt" --json >"$out/json/stats-$mode.json"
  unmount
done

python3 scripts/bench_report.py --out "$out" "$out"/json/*-qd*.json
echo "results in $out (results.md, results.csv, plot.png)"
