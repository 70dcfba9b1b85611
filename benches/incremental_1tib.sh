#!/usr/bin/env bash
# Cost of an incremental on a huge, mostly unchanged disk (issue 11, "cost follows the change,
# not the disk"): a 1 TiB disk holding 64 MiB of data (64 blocks of 1 MiB spread over the
# disk), a full backup, one 4 KiB write, then the incremental, timed with /usr/bin/time -v
# (wall time and peak RSS of the controller). Two paths:
#
#   xfs   a raw 1 TiB sparse image on a loop-mounted XFS (reflink=1): reflink snapshot,
#         change tracking from the extents (FIEMAP) of the snapshot and the base;
#   qemu  a 1 TiB qcow2 image attached to a running QEMU (TCG, paused with -S: no guest is
#         needed to write, the write goes through QEMU's qemu-io): fleecing, NBD, QEMU's
#         persistent dirty bitmap.
#
# Usage (as root): bash benches/incremental_1tib.sh [BINARY] [xfs|qemu|both]
#   BINARY defaults to target/release/bulwark-controller. BLOCK_SIZE=262144 (say) makes the
#   vaults with that block size. Results go to stdout, one line per
#   case: case, wall seconds, peak RSS (KiB), and the incremental's statistics.
# Needs: xfsprogs, qemu-system-x86, qemu-utils, python3. Work files in $BENCH_DIR (default
# /tmp/bulwark-1tib): a 1.1 TiB *sparse* file holding the XFS (a few hundred MiB used).
set -euo pipefail

BIN=$(realpath "${1:-target/release/bulwark-controller}")
WHICH=${2:-both}
DIR=${BENCH_DIR:-/tmp/bulwark-1tib}
[ "$(id -u)" = 0 ] || { echo "run as root (loop-mounts an XFS)" >&2; exit 1; }
mkdir -p "$DIR"
DIR=$(realpath "$DIR")
MNT=$DIR/mnt
LOOP=
QEMU_PID=

cleanup() {
    if [ -n "$QEMU_PID" ]; then kill "$QEMU_PID" 2>/dev/null || true; wait "$QEMU_PID" 2>/dev/null || true; fi
    if mountpoint -q "$MNT"; then umount "$MNT"; fi
    if [ -n "$LOOP" ]; then losetup -d "$LOOP"; fi
    rm -rf "$DIR/fs.img" "$DIR/vault-"* "$DIR/run"
}
trap cleanup EXIT

# One XFS of 1.1 TiB apparent size: room for the 1 TiB images and, for QEMU, for the fleecing
# image the controller insists on having room for. Sparse: only metadata is written.
truncate -s 1100G "$DIR/fs.img"
mkfs.xfs -q -f -m reflink=1 -l size=64m "$DIR/fs.img"
mkdir -p "$MNT" "$DIR/run"
LOOP=$(losetup -f --show "$DIR/fs.img")
mount "$LOOP" "$MNT"

# 64 MiB of data: 64 blocks of 1 MiB, 16001 MiB apart (not aligned to anything in particular).
offsets() { for i in $(seq 0 63); do echo $(( (i * 16001 + 7) << 20 )); done; }

timed() { # timed NAME ARGS...: runs the controller under /usr/bin/time -v
    local name=$1; shift
    /usr/bin/time -v -o "$DIR/$name.time" "$BIN" "$@" > "$DIR/$name.json"
}

report() { # report CASE
    local t=$DIR/$1-incr.time
    local wall rss
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$t")
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$t")
    python3 - "$1" "$wall" "$rss" "$DIR/$1-incr.json" <<'EOF'
import json, sys
case, wall, rss, path = sys.argv[1:]
parts = [float(x) for x in wall.split(":")]
secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
j = json.load(open(path))
disks = j.get("disks") or j.get("report", {}).get("disks") or []
d = disks[0] if disks else {}
s = d.get("stats", d)
keys = ["blocks", "changed_blocks", "unchanged_blocks", "blocks_not_read", "hole_blocks",
        "bytes_read", "bytes_uploaded"]
stats = " ".join(f"{k}={s.get(k)}" for k in keys)
print(f"{case}: incremental wall {secs:.2f} s, peak RSS {int(rss) / 1024:.0f} MiB; "
      f"change tracking: {d.get('change_tracking') or 'used'}; {stats}")
EOF
}

run_xfs() {
    local img=$MNT/xfs-disk.img vault=$DIR/vault-xfs
    truncate -s 1T "$img"
    for off in $(offsets); do
        head -c 1M /dev/urandom | dd of="$img" bs=1M seek=$((off >> 20)) conv=notrunc status=none
    done
    sync
    "$BIN" init --vault "$vault" ${BLOCK_SIZE:+--block-size "$BLOCK_SIZE"} > /dev/null
    timed xfs-full backup --vault "$vault" --vm big --disk "os=$img" --snapshot reflink \
        --snapshot-dir "$MNT/snaps" --json
    # One 4 KiB write into a hole, 700 GiB in.
    head -c 4096 /dev/urandom | dd of="$img" bs=4096 seek=$(( (700 << 30) / 4096 )) conv=notrunc status=none
    sync
    timed xfs-incr backup --vault "$vault" --vm big --disk "os=$img" --snapshot reflink \
        --snapshot-dir "$MNT/snaps" --json
    report xfs
    rm -rf "$img" "$MNT/snaps"
}

qmp() { # qmp SOCKET JSON-COMMAND...: one QMP session, prints the replies
    python3 - "$@" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
json.loads(f.readline())
def cmd(c):
    f.write(json.dumps(c) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "event" not in r:
            if "error" in r:
                sys.exit(f"QMP error: {r}")
            return r
cmd({"execute": "qmp_capabilities"})
for c in sys.argv[2:]:
    print(json.dumps(cmd(json.loads(c))))
EOF
}

run_qemu() {
    local img=$MNT/qemu-disk.qcow2 vault=$DIR/vault-qemu
    qemu-img create -q -f qcow2 "$img" 1T
    local cmds=()
    local i=0
    for off in $(offsets); do
        cmds+=(-c "write -P $(( (i % 250) + 1 )) $off 1M")
        i=$((i + 1))
    done
    qemu-io -f qcow2 "${cmds[@]}" "$img" > /dev/null
    qemu-system-x86_64 -M q35 -S -nodefaults -display none -accel tcg \
        -qmp "unix:$DIR/run/qmp.sock,server=on,wait=off" \
        -qmp "unix:$DIR/run/qmp-bench.sock,server=on,wait=off" \
        -drive "id=os,file=$img,format=qcow2,if=none" &
    QEMU_PID=$!
    for _ in $(seq 100); do [ -S "$DIR/run/qmp-bench.sock" ] && break; sleep 0.1; done
    "$BIN" init --vault "$vault" ${BLOCK_SIZE:+--block-size "$BLOCK_SIZE"} > /dev/null
    timed qemu-full backup --vault "$vault" --vm big --qmp "unix:$DIR/run/qmp.sock" \
        --runtime-dir "$DIR/run/bulwark" --json
    # One 4 KiB write through QEMU (what a guest's write does to the dirty bitmap), 700 GiB in.
    qmp "$DIR/run/qmp-bench.sock" \
        "{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"qemu-io os \\\"write -P 0x77 $((700 << 30)) 4k\\\"\"}}" > /dev/null
    timed qemu-incr backup --vault "$vault" --vm big --qmp "unix:$DIR/run/qmp.sock" \
        --runtime-dir "$DIR/run/bulwark" --json
    report qemu
    kill "$QEMU_PID"; wait "$QEMU_PID" 2>/dev/null || true; QEMU_PID=
    rm -f "$img"
}

case $WHICH in
    xfs) run_xfs ;;
    qemu) run_qemu ;;
    both) run_xfs; run_qemu ;;
    *) echo "unknown case $WHICH (xfs, qemu, both)" >&2; exit 2 ;;
esac
