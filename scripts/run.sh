#!/usr/bin/env bash
# The completion-mode comparison: for each mode, mount deferfs on a pre-written
# backing file and run the fio matrix (scripts/fio/*.fio at queue depths
# 1..32); run the same matrix on the backing file itself first (the physical
# limit), and two references for reads: libfuse's passthrough_ll example over
# the backing file's directory, and reads of a hole on deferfs (the FUSE round
# trip alone, no device IO). Writes results/<stamp>/{results.csv,results.md,
# plot.png} and prints the Markdown tables.
#   scripts/run.sh [--quick | --goals] [--modes "defer workqueue ..."] [--jobs "randread ..."]
#                  [--qds "1 16"] [--repeat N] [--no-reference] [--transports "dev uring"]
#                  [--backing PATH] [--size SIZE] [--runtime SECONDS] [--options "cpus=1,..."]
# Default: the five modes, every job, queue depths 1-32, 3 s per run, once
# (about ten minutes); --quick: queue depths 1 and 16 at 2 s (about 2½);
# --goals: what issue 5's goals compare (workqueue, defer and auto; allocating
# writes, overwrites and reads at queue depths 1, 8, 16 and 32), three times
# (about ten minutes). Options after a preset change it.
# --repeat N runs the whole matrix N times, the modes in a rotated order each
# time; the tables then show medians and the spread. --transports "dev uring"
# mounts each mode twice, the second time with FUSE over io_uring (target
# MODE_uring; the kernel's switch is turned on for the run and put back after).
# --options adds deferfs mount options (-o) to every mode's mount.
set -euo pipefail
cd "$(dirname "$0")/.."

modes="inline workqueue defer auto sync"
jobs="randwrite-alloc randwrite-overwrite randread randwrite-dsync"
qds="1 2 4 8 16 32"
runtime=3
repeat=1
reference=1
transports=dev
extra_opts=
backing=/var/tmp/deferfs/bench.img
size=4G
while (($#)); do
  case "$1" in
    --quick) qds="1 16"; runtime=2; shift ;;
    --goals) modes="workqueue defer auto"; jobs="randwrite-alloc randwrite-overwrite randread"
             qds="1 8 16 32"; repeat=3; shift ;;
    --modes) modes=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --qds) qds=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --no-reference) reference=0; shift ;;
    --transports) transports=$2; shift 2 ;;
    --options) extra_opts=$2; shift 2 ;;
    --backing) backing=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    *) echo "run.sh: unknown argument '$1' (see the header of scripts/run.sh)" >&2; exit 2 ;;
  esac
done
for j in $jobs; do
  [ -f "scripts/fio/$j.fio" ] || { echo "run.sh: no job '$j' in scripts/fio/ (--jobs)" >&2; exit 2; }
done
[[ $repeat =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --repeat needs a positive count, not '$repeat'" >&2; exit 2; }
uring_switch=/sys/module/fuse/parameters/enable_uring
uring_was=
for t in $transports; do
  case "$t" in
    dev) ;;
    uring)
      [ -w "$uring_switch" ] || { echo "run.sh: --transports uring: this kernel has no FUSE over io_uring ($uring_switch; Linux 6.14+), or we are not root" >&2; exit 2; } ;;
    *) echo "run.sh: unknown transport '$t' (--transports takes dev and/or uring)" >&2; exit 2 ;;
  esac
done

scripts/setup.sh
bin=$PWD/build/deferfs
out=results/$(date +%Y%m%d-%H%M%S)
mkdir -p "$out/json"
if [ -n "$extra_opts" ]; then
  echo "== every mode mounted with -o $extra_opts"
  echo "$extra_opts" >"$out/mount-options.txt"
fi
mnt=$(mktemp -d /tmp/deferfs-bench.XXXXXX)
ptmnt=$(mktemp -d /tmp/deferfs-bench-passthrough.XXXXXX)
ptbin=$(mktemp -d /tmp/deferfs-bench-bin.XXXXXX)
cleanup() {
  mountpoint -q "$mnt" && { fusermount3 -u "$mnt" || umount -l "$mnt"; }
  mountpoint -q "$ptmnt" && { fusermount3 -u "$ptmnt" || umount -l "$ptmnt"; }
  rmdir "$mnt" "$ptmnt" 2>/dev/null || true
  rm -rf "$ptbin"
  if [ -n "$uring_was" ]; then echo "$uring_was" >"$uring_switch"; fi
}
trap cleanup EXIT
if [[ " $transports " == *" uring "* ]] && [ "$(cat "$uring_switch")" != Y ]; then
  uring_was=$(cat "$uring_switch")
  echo "== switching FUSE over io_uring on for this run ($uring_switch, back to $uring_was at the end)"
  echo Y >"$uring_switch"
fi

# umount returns before the deferfs daemon has exited; it holds the backing's
# flock until then, so wait for that before the next mkfs.
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

has_job() { [[ " $jobs " == *" $1 "* ]]; }

# CPU seconds (user + system) the file server has used so far: the deferfs
# daemon or passthrough_ll. A far steadier figure than IOPS on a noisy VM.
# Nothing (and no CPU column) if the server's process was not found.
server_pid=
server_cpu() {
  [ -n "$server_pid" ] && [ -r "/proc/$server_pid/stat" ] || return 0
  awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f\n", ($14 + $15) / hz }' "/proc/$server_pid/stat"
}

# This machine's steal and total CPU ticks so far (/proc/stat): on a VM, the
# time its vCPUs were ready to run and the host ran something else instead.
cpu_ticks() {
  awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print $9, t; exit }' /proc/stat
}

run() {  # run WORKLOAD TARGET FILE QD REP
  local job=$1 target=$2 file=$3 qd=$4 rep=$5
  local json=$out/json/$target-$job-qd$qd-r$rep.json cpu0= ticks0
  printf '  %-11s %-20s qd=%-3s ' "$target" "$job" "$qd"
  if [ "$target" != raw ]; then cpu0=$(server_cpu); fi
  ticks0=$(cpu_ticks)
  FILE=$file SIZE=$fsize QD=$qd RUNTIME=$runtime fio --output-format=json --output="$json" "scripts/fio/$job.fio"
  # Beside the JSON: the server's CPU seconds during the run, and the percent
  # of this machine's CPU time the host stole meanwhile.
  if [ -n "$cpu0" ]; then
    awk -v a="$(server_cpu)" -v b="$cpu0" 'BEGIN { printf "%.3f\n", a - b }' >"${json%.json}.cpu"
  fi
  echo "$ticks0 $(cpu_ticks)" | awk '$4 > $2 { printf "%.1f\n", 100 * ($3 - $1) / ($4 - $2) }' >"${json%.json}.steal"
  python3 scripts/bench_report.py --brief "$json"
}

# libfuse's own passthrough_ll, built from the example Debian ships with
# libfuse3-dev, serving the backing file's directory.
ptsrc=/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c
passthrough() {  # passthrough REP
  local rep=$1
  if [ ! -x "$ptbin/passthrough_ll" ]; then
    # shellcheck disable=SC2046
    cc -O2 $(pkg-config fuse3 --cflags) "$ptsrc" -o "$ptbin/passthrough_ll" $(pkg-config fuse3 --libs)
  fi
  "$ptbin/passthrough_ll" -o source="$(dirname "$backing")" "$ptmnt"
  server_pid=$(pgrep -f -- "$ptbin/passthrough_ll" | head -1)
  local file=$ptmnt/$(basename "$backing") err
  for qd in $qds; do run randread passthrough "$file" "$qd" "$rep"; done
  # O_DIRECT writes: libfuse 3.14's example fails them (it opens the file
  # O_DIRECT and writes from an unaligned buffer). Record what fio gets, and
  # measure them like the reads should a later example manage.
  err=$(FILE=$file SIZE=$fsize QD=1 RUNTIME=1 fio scripts/fio/randwrite-overwrite.fio 2>&1 |
        grep -o 'error=[^)]*' | head -1 || true)
  if [ -n "$err" ]; then
    echo "O_DIRECT 4k writes fail (fio: $err)" >"$out/json/passthrough-note.txt"
    echo "  passthrough O_DIRECT 4k writes fail (fio: $err)"
  else
    for qd in $qds; do run randwrite-overwrite passthrough "$file" "$qd" "$rep"; done
  fi
  fusermount3 -u "$ptmnt"
}

if ((reference)) && [ ! -f "$ptsrc" ]; then
  echo "run.sh: $ptsrc is missing (a dpkg path-exclude for /usr/share/doc?): no passthrough_ll reference in this run" >&2
fi
with_pt=0
((reference)) && has_job randread && [ -f "$ptsrc" ] && with_pt=1
# A mount variant per mode and transport: "defer" (dev) or "defer_uring".
mode_list=()
for m in $modes; do
  for t in $transports; do
    if [ "$t" = dev ]; then mode_list+=("$m"); else mode_list+=("${m}_$t"); fi
  done
done
nmodes=${#mode_list[@]}
total=$(( (nmodes + with_pt + 1) * repeat ))
n=0
for ((rep = 1; rep <= repeat; rep++)); do
  echo "== raw backing file ($((++n))/$total)"
  # The region the raw jobs use is written just before, as each mode's
  # `written` file is below: the host's cache then holds both alike. A region
  # the host has evicted reads at its own disk's speed (1-2k IOPS on this
  # project's VM some days), which would make deferfs look faster than raw.
  dd if=/dev/zero of="$backing" bs=1M count=$((bytes / 4 / 1048576)) oflag=direct conv=notrunc status=none
  for qd in $qds; do
    for job in randwrite-overwrite randread randwrite-dsync; do
      # randwrite-alloc on the raw file is a plain overwrite: measured once as that.
      if has_job "$job" || { [ "$job" = randwrite-overwrite ] && has_job randwrite-alloc; }; then
        run "$job" raw "$backing" "$qd" "$rep"
      fi
    done
  done
  if ((with_pt)); then
    echo "== libfuse passthrough_ll ($((++n))/$total)"
    passthrough "$rep"
  fi

  # Rotate the order each repetition, so slow drift in this machine's speed
  # does not always fall on the same mode.
  for ((i = 0; i < nmodes; i++)); do
    mode=${mode_list[$(( (i + rep - 1) % nmodes ))]}
    opts="completion=${mode%_uring}"
    [[ $mode == *_uring ]] && opts+=",transport=uring"
    [ -n "$extra_opts" ] && opts+=",$extra_opts"
    echo "== $opts ($((++n))/$total)"
    "$bin" mkfs "$backing" --force >/dev/null
    "$bin" mount "$backing" "$mnt" -o "$opts"
    server_pid=$(pgrep -f -- "mount $backing $mnt " | head -1)
    if ((reference)) && ((i == 0)) && has_job randread; then
      # The FUSE round trip alone: reads of a hole are answered by the worker
      # without device IO, whatever the completion mode.
      truncate -s "$fsize" "$mnt/hole"
      for qd in $qds; do run randread floor "$mnt/hole" "$qd" "$rep"; done
      rm -f "$mnt/hole"
    fi
    if has_job randwrite-overwrite || has_job randread || has_job randwrite-dsync; then
      dd if=/dev/zero of="$mnt/written" bs=1M count=$((bytes / 4 / 1048576)) oflag=direct status=none
    fi
    for qd in $qds; do
      if has_job randwrite-alloc; then
        run randwrite-alloc "$mode" "$mnt/alloc-$qd" "$qd" "$rep"
        rm -f "$mnt/alloc-$qd"
        sync -f "$mnt"  # freed blocks are reusable after a metadata sync
      fi
      for job in randwrite-overwrite randread randwrite-dsync; do
        has_job "$job" && run "$job" "$mode" "$mnt/written" "$qd" "$rep"
      done
    done
    "$bin" stats "$mnt" --json >"$out/json/stats-$mode-r$rep.json"
    unmount
  done
done

python3 scripts/bench_report.py --out "$out" "$out"/json/*-qd*.json
echo "results in $out (results.md, results.csv, plot.png)"
