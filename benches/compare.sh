#!/usr/bin/env bash
# Side-by-side benchmark: Bulwark against restic and borg on one raw ext4 guest image.
#
#   sudo bash benches/compare.sh [--size 4G] [--runs 3] [--out DIR] [--work DIR]
#                                [--write-run 64K] [--no-mem16]
#                                [--tools bulwark,bulwark-notrack,bulwark-256k,restic,borg]
#                                [--cases xfs,ext4,vm] [--datastore-factor 8] [--ext4-factor 4]
#                                [--bin PATH-TO-bulwark-controller (default: cargo build --release)]
#                                [--keep (keep the XFS datastore image; removed by default)]
#
# Needs root (loop mounts), mkfs.xfs, mkfs.ext4, restic, borg, zstd, /usr/bin/time, python3
# (matplotlib for the plot; without it the table is still written); for the ext4 and vm cases
# qemu-storage-daemon and qemu-system-x86_64.
#
# Cases (--cases, default all three):
#  xfs   the image on a reflink XFS datastore (steps 1-5 below; all --tools).
#  ext4  the same image on a loop-mounted ext4 datastore (the most common host): Bulwark with
#        its defaults (--snapshot auto reads a raw image on ext4 directly in place, holding
#        QEMU's image locks itself, no copy, no qemu-storage-daemon), restic and borg on the file.
#        Tools ext4-bulwark, ext4-restic, ext4-borg. Then the same image converted to qcow2
#        (untimed; tools ext4q-*): the 1% of writes go through qemu-io (a QEMU program, as a VM
#        would write), so Bulwark's incremental reads only what the image's persistent dirty
#        bitmap marks (left by the full backup); restic and borg back up the qcow2 file. A raw
#        image has no place for a bitmap: its incremental reads the whole disk.
#  vm    the image on the ext4 datastore as the data disk of a running QEMU (TCG, no OS: the
#        firmware idles), backed up through --qmp (fleecing point in time, dirty bitmap); the
#        same 1% of writes go through QEMU (QMP human-monitor-command qemu-io) so the bitmap
#        sees them; restic and borg read the image file of the running VM (not consistent, as
#        they would be used). Tools vm-bulwark, vm-restic, vm-borg. The VM is stopped before
#        each restore.
# The ext4 and vm cases run whichever of bulwark, bulwark-256k, restic, borg are in --tools
# (tools ext4-bulwark-256k, ext4q-bulwark-256k, vm-bulwark-256k for the 256 KiB vaults).
#
# What it does (see BENCHMARKS.md for the reasoning):
#  1. A sparse XFS file system (reflink=1, the design's datastore) is loop-mounted under the work
#     dir. Every image, repository and restore target lives on it, for all tools alike.
#  2. A raw ext4 guest image of --size is made with mkfs.ext4, loop-mounted and filled with
#     read-only copies of host system files (/usr/share, parts of /usr/lib: compressible) up to
#     40% of the size and random files (incompressible) up to 15% more; the rest stays free.
#  3. Per run and per tool: the pristine image is reflink-cloned to guest.img, read once (warm
#     page cache), backed up in full, changed by the same scattered writes (1% of the disk in
#     --write-run sized extents at random 4 KiB-aligned offsets, written directly into the image,
#     seeded per run so every tool sees the same bytes), read once again, backed up
#     incrementally, and the latest point restored to a new file (checked with cmp in run 1).
#     Bulwark fsyncs the restored image before renaming it into place; restic and borg do not,
#     so their restore commands end with `sync -f` (syncfs of the datastore): all three are
#     timed until the restored data is durable. Before each restore the datastore is synced
#     and left 2 s to finish deferred work of the backup (untimed, for every tool).
#  4. Baselines: cat image > /dev/null (warm), cat of a fresh reflink clone, zstd -1 -T0.
#     Bulwark variants: `bulwark` (defaults: 1 MiB blocks, change tracking from the kept reflink
#     base), `bulwark-notrack` (--no-change-tracking: the incremental reads the whole snapshot),
#     `bulwark-256k` (a vault made with --block-size 262144).
#  5. Memory at 16 GiB: Bulwark backs up a sparse 16 GiB image (the 4 GiB guest + 12 GiB hole).
# Results: OUT/results.csv (one line per timed command), OUT/repos.csv, OUT/summary.md, OUT/compare.png.
set -euo pipefail

SIZE=4G
RUNS=3
OUT=""
WORK=/var/tmp/bulwark-compare
WRITE_RUN=64K
TOOLS=bulwark,bulwark-notrack,bulwark-256k,restic,borg
MEM16=1
KEEP=0
CASES=xfs,ext4,vm
DS_FACTOR=8
EXT4_FACTOR=4
BULWARK=""
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --size) SIZE="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        --write-run) WRITE_RUN="$2"; shift 2 ;;
        --tools) TOOLS="$2"; shift 2 ;;
        --no-mem16) MEM16=0; shift ;;
        --keep) KEEP=1; shift ;;
        --bin) BULWARK="$2"; shift 2 ;;
        --cases) CASES="$2"; shift 2 ;;
        --datastore-factor) DS_FACTOR="$2"; shift 2 ;;
        --ext4-factor) EXT4_FACTOR="$2"; shift 2 ;;
        -h|--help) sed -n '2,45p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
OUT="${OUT:-$WORK/out}"

if [[ $(id -u) -ne 0 ]]; then
    echo "compare.sh needs root: it loop-mounts an XFS datastore and an ext4 guest image" >&2
    exit 1
fi
has_case() { [[ ",$CASES," == *,$1,* ]]; }
need=(mkfs.xfs mkfs.ext4 restic borg zstd python3 cmp)
if has_case ext4 || has_case vm; then need+=(qemu-storage-daemon qemu-system-x86_64 qemu-img qemu-io); fi
for t in "${need[@]}"; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
[[ -x /usr/bin/time ]] || { echo "missing /usr/bin/time (apt-get install time)" >&2; exit 1; }

bytes() { numfmt --from=iec "$1"; }
SIZE_B=$(bytes "$SIZE")
RUN_B=$(bytes "$WRITE_RUN")

if [[ -z $BULWARK ]]; then
    echo "== building bulwark-controller (release)"
    (cd "$ROOT" && cargo build --release -q -p bulwark-controller-bin)
    BULWARK="$ROOT/target/release/bulwark-controller"
fi

XFS="$WORK/xfs"
EXT4="$WORK/ext4"
GUESTMNT="$WORK/guest"
RUNDIR="$WORK/run"
VMDIR="$WORK/vm"
stop_vm() { # kills the QEMU this script started, by the pid in its own pid file
    [[ -s "$VMDIR/qemu.pid" ]] || return 0
    local pid; pid=$(cat "$VMDIR/qemu.pid")
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF "$VMDIR/qmp.sock"; then
        kill "$pid"
        for _ in $(seq 100); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
    fi
    rm -f "$VMDIR/qemu.pid" "$VMDIR/qmp.sock"
}
cleanup() {
    set +e
    stop_vm
    mountpoint -q "$GUESTMNT" && umount "$GUESTMNT"
    mountpoint -q "$XFS" && umount "$XFS"
    mountpoint -q "$EXT4" && umount "$EXT4"
    # The datastores hold up to ~4x the image size; the results stay in OUT.
    [[ $KEEP == 1 ]] || rm -f "$WORK/xfs.img"
    rm -f "$WORK/ext4.img" "$WORK/base.img"
}
trap cleanup EXIT

mkdir -p "$WORK" "$OUT" "$XFS" "$EXT4" "$GUESTMNT" "$RUNDIR" "$VMDIR"
mountpoint -q "$GUESTMNT" && umount "$GUESTMNT"
mountpoint -q "$XFS" && umount "$XFS"
mountpoint -q "$EXT4" && umount "$EXT4"
rm -f "$WORK/xfs.img" "$WORK/ext4.img" "$WORK/base.img"
avail=$(df --output=avail -B1 "$WORK" | tail -1)
if (( avail < SIZE_B * (DS_FACTOR + 1) )); then
    echo "not enough free space in $WORK: $((avail >> 30)) GiB, need about $((SIZE_B * (DS_FACTOR + 1) >> 30)) GiB" >&2
    exit 1
fi

echo "== making a $SIZE ext4 guest image"
# Made on the host file system, then copied (sparse) into each case's datastore.
BASE0="$WORK/base.img"
truncate -s "$SIZE_B" "$BASE0"
mkfs.ext4 -q -F "$BASE0"
mount -o loop "$BASE0" "$GUESTMNT"
budget=$((SIZE_B * 40 / 100))
for d in /usr/share /usr/lib/x86_64-linux-gnu /usr/lib/llvm-14 /usr/lib/jvm /usr/lib/gcc /usr/lib/python3 /usr/lib/google-cloud-sdk; do
    [[ -d "$d" ]] || continue
    sz=$(du -sb "$d" | cut -f1)
    if (( sz <= budget )); then
        mkdir -p "$GUESTMNT/$(dirname "$d")"
        cp -a "$d" "$GUESTMNT/$d"
        budget=$((budget - sz))
    fi
done
mkdir -p "$GUESTMNT/data"
rnd=$((SIZE_B * 15 / 100 / (64 << 20)))
for i in $(seq 1 "$rnd"); do
    head -c $((64 << 20)) /dev/urandom > "$GUESTMNT/data/random-$i.bin"
done
sync
df -h "$GUESTMNT" | tail -1 | awk '{print "guest fs used " $3 " of " $2}'
umount "$GUESTMNT"
echo "image allocated: $(du -h "$BASE0" | cut -f1) of $SIZE"

RES="$OUT/results.csv"
REPOS="$OUT/repos.csv"
echo "tool,op,run,wall_s,max_rss_kb,load1" > "$RES"
echo "tool,run,repo_bytes_apparent,repo_bytes_allocated" > "$REPOS"

# measure TOOL OP RUN -- CMD...: runs CMD under /usr/bin/time, appends one CSV line.
measure() {
    local tool=$1 op=$2 run=$3; shift 4
    local load; load=$(cut -d' ' -f1 /proc/loadavg)
    /usr/bin/time -f '%e %M' -o "$OUT/time.tmp" "$@" > "$OUT/log-$tool-$op-$run.txt" 2>&1 || {
        echo "FAILED: $tool $op run $run (see $OUT/log-$tool-$op-$run.txt)" >&2
        tail -20 "$OUT/log-$tool-$op-$run.txt" >&2
        exit 1
    }
    local wall rss; read -r wall rss < <(tail -1 "$OUT/time.tmp")
    echo "$tool,$op,$run,$wall,$rss,$load" >> "$RES"
    printf '  %-12s %-12s run %s: %6.2f s  %7d KiB  (load %s)\n' "$tool" "$op" "$run" "$wall" "$rss" "$load"
}

settle() { # untimed: write back everything
    sync
}

check_restore() { # run, restored file
    if [[ $1 == 1 ]]; then
        if cmp -s "$IMG" "$2"; then echo "  restore matches the image"; else echo "RESTORE DIFFERS: $2" >&2; exit 1; fi
    fi
}

repo_size() { # tool run dir
    echo "$1,$2,$(du -sb "$3" | cut -f1),$(du -s --block-size=1 "$3" | cut -f1)" >> "$REPOS"
}

scatter() { # the same writes for every tool in run $1
    python3 "$HERE/compare.py" scatter "$IMG" 0.01 "$RUN_B" "$1"
    cat "$IMG" > /dev/null
}

export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$XFS/cache/restic"
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export BORG_BASE_DIR="$XFS/cache/borg"

if has_case xfs; then
# Room for the image, clones' diverging blocks, three repositories and one restore at a time.
# Allocated up front (fallocate; mkfs -K keeps it so): the first writes of the first tool do not
# pay for allocations in the host file system that later tools find done.
fallocate -l $((SIZE_B * DS_FACTOR)) "$WORK/xfs.img"
mkfs.xfs -q -f -K -m reflink=1 "$WORK/xfs.img"
# No discard, no trim: punching freed blocks out of the backing file (online discard or fstrim)
# made the next writes allocate in the host file system again, and a restore into such space
# took up to 2x longer depending on which tool's leftovers had just been freed. Without it every
# tool writes into space the datastore allocated before, like on a real disk; the backing file
# grows up to the datastore's size (8x the image) and is deleted at the end.
mount -o loop "$WORK/xfs.img" "$XFS"
mkdir -p "$XFS/repos" "$XFS/restore" "$XFS/cache"

BASE="$XFS/base.img"
cp --sparse=always "$BASE0" "$BASE"
IMG="$XFS/guest.img"

fresh_image() {
    rm -f "$IMG"
    settle
    cp --reflink=always "$BASE" "$IMG"
    cat "$IMG" > /dev/null
}


for run in $(seq 1 "$RUNS"); do
    echo "== run $run/$RUNS (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    fresh_image
    measure cat warm "$run" -- sh -c "cat '$IMG' > /dev/null"
    rm -f "$XFS/clone.img"; cp --reflink=always "$IMG" "$XFS/clone.img"
    measure cat clone "$run" -- sh -c "cat '$XFS/clone.img' > /dev/null"
    rm -f "$XFS/clone.img"
    measure zstd full "$run" -- sh -c "zstd -q -1 -T0 -c '$IMG' > /dev/null"

    for tool in ${TOOLS//,/ }; do
        repo="$XFS/repos/$tool"
        rm -rf "$repo" "$XFS/cache"/* "$XFS/restore"/* "$XFS/.bulwark-snapshots"
        mkdir -p "$XFS/restore/$tool"
        fresh_image
        case $tool in
        bulwark|bulwark-notrack|bulwark-256k)
            init=() track=()
            [[ $tool == bulwark-256k ]] && init=(--block-size 262144)
            [[ $tool == bulwark-notrack ]] && track=(--no-change-tracking)
            "$BULWARK" init --vault "$repo" "${init[@]}" > /dev/null
            measure "$tool" full "$run" -- "$BULWARK" backup --vault "$repo" --vm guest --disk "os=$IMG" --snapshot reflink "${track[@]}" --json
            scatter "$run"
            measure "$tool" incremental "$run" -- "$BULWARK" backup --vault "$repo" --vm guest --disk "os=$IMG" --snapshot reflink "${track[@]}" --json
            settle; sleep 2 # let deferred file-system work of the backup (freeing extents) finish, untimed
            out="$XFS/restore/$tool/guest.img"
            measure "$tool" restore "$run" -- "$BULWARK" restore --vault "$repo" --vm guest --disk os --to "$out" --json
            ;;
        restic)
            restic -r "$repo" init > /dev/null
            measure restic full "$run" -- restic -r "$repo" backup "$IMG"
            scatter "$run"
            measure restic incremental "$run" -- restic -r "$repo" backup "$IMG"
            settle; sleep 2 # let deferred file-system work of the backup (freeing extents) finish, untimed
            measure restic restore "$run" -- sh -c "restic -r '$repo' restore latest --target '$XFS/restore/restic' && sync -f '$XFS/restore'"
            out="$XFS/restore/restic/$IMG"
            ;;
        borg)
            borg init -e none "$repo" > /dev/null
            measure borg full "$run" -- sh -c "cd '$XFS' && borg create --compression zstd,1 '$repo::full' guest.img"
            scatter "$run"
            measure borg incremental "$run" -- sh -c "cd '$XFS' && borg create --compression zstd,1 '$repo::incremental' guest.img"
            settle; sleep 2 # let deferred file-system work of the backup (freeing extents) finish, untimed
            measure borg restore "$run" -- sh -c "cd '$XFS/restore/borg' && borg extract --sparse '$repo::incremental' && sync -f ."
            out="$XFS/restore/borg/guest.img"
            ;;
        esac
        check_restore "$run" "$out"
        repo_size "$tool" "$run" "$repo"
        rm -rf "$XFS/restore/$tool" "$repo"
    done
done

if [[ $MEM16 == 1 && ",$TOOLS," == *,bulwark,* ]]; then
    echo "== memory at 16 GiB: the guest image plus a 12 GiB hole"
    big="$XFS/big.img"
    rm -rf "$big" "$XFS/repos/mem16"
    cp --reflink=always "$BASE" "$big"
    truncate -s 16G "$big"
    "$BULWARK" init --vault "$XFS/repos/mem16" > /dev/null
    cat "$big" > /dev/null
    measure bulwark full-16G 1 -- "$BULWARK" backup --vault "$XFS/repos/mem16" --vm big --disk "os=$big" --snapshot reflink --json
    rm -rf "$big" "$XFS/repos/mem16"
fi
XFS_NOTE="XFS (reflink=1) on a loop device backed by a preallocated file on $(df --output=fstype "$WORK" | tail -1) ($(df --output=source "$WORK" | tail -1))"
umount "$XFS"
[[ $KEEP == 1 ]] || rm -f "$WORK/xfs.img"
fi # xfs case

if has_case ext4 || has_case vm; then
    # The same image on ext4: a datastore file allocated up front like the XFS one, never
    # trimmed; room for the pristine image (raw, and qcow2 for the ext4 case), the working image,
    # one repository and one restore (--ext4-factor times the image size, default 4).
    fallocate -l $((SIZE_B * EXT4_FACTOR)) "$WORK/ext4.img"
    mkfs.ext4 -q -F -E nodiscard "$WORK/ext4.img"
    mount -o loop,nodiscard "$WORK/ext4.img" "$EXT4"
    mkdir -p "$EXT4/repos" "$EXT4/restore" "$EXT4/cache"
    export RESTIC_CACHE_DIR="$EXT4/cache/restic" BORG_BASE_DIR="$EXT4/cache/borg"
    cp --sparse=always "$BASE0" "$EXT4/base.img"
    has_case ext4 && qemu-img convert -f raw -O qcow2 "$EXT4/base.img" "$EXT4/base.qcow2"
    IMG="$EXT4/guest.img"
    fresh_ext4() { # a full sparse copy (untimed): ext4 has no reflink
        rm -f "$EXT4/guest.img" "$EXT4/guest.qcow2"
        if [[ $IMG == *.qcow2 ]]; then cp --sparse=always "$EXT4/base.qcow2" "$IMG"; else cp --sparse=always "$EXT4/base.img" "$IMG"; fi
        settle
        cat "$IMG" > /dev/null
    }
    start_vm() { # the image as the data disk `data` of a TCG VM that runs no OS
        stop_vm
        qemu-system-x86_64 -machine pc -accel tcg -m 128 -smp 1 -nodefaults -no-user-config \
            -display none -qmp "unix:$VMDIR/qmp.sock,server=on,wait=off" \
            -pidfile "$VMDIR/qemu.pid" -daemonize \
            -drive "id=data,file=$IMG,format=raw,if=none" -device virtio-blk-pci,drive=data
        python3 "$HERE/compare.py" qmp "$VMDIR/qmp.sock" query-status | grep -q '"running": true'
    }
    case_tools=()
    for t in bulwark bulwark-256k restic borg; do [[ ",$TOOLS," == *,$t,* ]] && case_tools+=("$t"); done
    for run in $(seq 1 "$RUNS"); do
        for c in ext4 ext4q vm; do
            if [[ $c == ext4q ]]; then has_case ext4 || continue; else has_case "$c" || continue; fi
            IMG="$EXT4/guest.img"; [[ $c == ext4q ]] && IMG="$EXT4/guest.qcow2"
            NAME=$(basename "$IMG")
            echo "== $c case, run $run/$RUNS (load: $(cut -d' ' -f1-3 /proc/loadavg))"
            for t in "${case_tools[@]}"; do
                tool="$c-$t"
                repo="$EXT4/repos/$tool"
                rm -rf "$repo" "$EXT4/cache"/* "$EXT4/restore"/*
                mkdir -p "$EXT4/restore/$tool"
                fresh_ext4
                if [[ $c == vm ]]; then
                    start_vm
                    change() { python3 "$HERE/compare.py" qmp-scatter "$VMDIR/qmp.sock" data "$SIZE_B" 0.01 "$RUN_B" "$run" "$VMDIR"; }
                elif [[ $c == ext4q ]]; then
                    change() { python3 "$HERE/compare.py" qcow2-scatter "$IMG" "$SIZE_B" 0.01 "$RUN_B" "$run" "$VMDIR"; cat "$IMG" > /dev/null; }
                else
                    change() { scatter "$run"; }
                fi
                case $t in
                bulwark|bulwark-256k)
                    init=(); [[ $t == bulwark-256k ]] && init=(--block-size 262144)
                    "$BULWARK" init --vault "$repo" "${init[@]}" > /dev/null
                    if [[ $c == vm ]]; then src=(--qmp "unix:$VMDIR/qmp.sock"); else src=(--disk "os=$IMG"); fi
                    measure "$tool" full "$run" -- "$BULWARK" backup --vault "$repo" --vm guest "${src[@]}" --runtime-dir "$RUNDIR" --json
                    change
                    measure "$tool" incremental "$run" -- "$BULWARK" backup --vault "$repo" --vm guest "${src[@]}" --runtime-dir "$RUNDIR" --json
                    if [[ -e "$EXT4/.bulwark-snapshots" ]]; then
                        echo "Bulwark made a snapshot copy on ext4: $(du -sh "$EXT4/.bulwark-snapshots")" >&2; exit 1
                    fi
                    stop_vm
                    settle; sleep 2
                    disk=os; [[ $c == vm ]] && disk=data
                    out="$EXT4/restore/$tool/guest.img"
                    measure "$tool" restore "$run" -- "$BULWARK" restore --vault "$repo" --vm guest --disk "$disk" --to "$out" --json
                    ;;
                restic)
                    restic -r "$repo" init > /dev/null
                    measure "$tool" full "$run" -- restic -r "$repo" backup "$IMG"
                    change
                    measure "$tool" incremental "$run" -- restic -r "$repo" backup "$IMG"
                    stop_vm
                    settle; sleep 2
                    measure "$tool" restore "$run" -- sh -c "restic -r '$repo' restore latest --target '$EXT4/restore/$tool' && sync -f '$EXT4/restore'"
                    out="$EXT4/restore/$tool/$IMG"
                    ;;
                borg)
                    borg init -e none "$repo" > /dev/null
                    measure "$tool" full "$run" -- sh -c "cd '$EXT4' && borg create --compression zstd,1 '$repo::full' '$NAME'"
                    change
                    measure "$tool" incremental "$run" -- sh -c "cd '$EXT4' && borg create --compression zstd,1 '$repo::incremental' '$NAME'"
                    stop_vm
                    settle; sleep 2
                    measure "$tool" restore "$run" -- sh -c "cd '$EXT4/restore/$tool' && borg extract --sparse '$repo::incremental' && sync -f ."
                    out="$EXT4/restore/$tool/$NAME"
                    ;;
                esac
                if [[ $tool == ext4q-bulwark* ]]; then
                    # Bulwark restores the guest's disk (raw), the others the qcow2 file.
                    if [[ $run == 1 ]]; then
                        qemu-img compare -q -f raw -F qcow2 "$out" "$IMG" || { echo "RESTORE DIFFERS: $out" >&2; exit 1; }
                        echo "  restore matches the image (qemu-img compare)"
                    fi
                else
                    check_restore "$run" "$out"
                fi
                repo_size "$tool" "$run" "$repo"
                rm -rf "$EXT4/restore/$tool" "$repo"
            done
        done
    done
    EXT4_NOTE="ext4 on a loop device backed by a preallocated file on $(df --output=fstype "$WORK" | tail -1); VM: qemu-system-x86_64 $(qemu-system-x86_64 --version | head -1 | grep -o '[0-9][0-9.]*' | head -1) TCG, no OS"
    umount "$EXT4"
fi
rm -f "$OUT/time.tmp"

{
    echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "cases: $CASES"
    [[ -n ${XFS_NOTE:-} ]] && echo "datastore (xfs case): $XFS_NOTE"
    [[ -n ${EXT4_NOTE:-} ]] && echo "datastore (ext4, vm cases): $EXT4_NOTE"
    echo "image: $SIZE ext4, allocated $(du -h "$BASE0" | cut -f1); scattered writes: 1% of the disk in $WRITE_RUN extents"
    echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "tools: $("$BULWARK" --version 2>/dev/null || echo bulwark), $(restic version | cut -d' ' -f1-2), $(borg --version), zstd $(zstd -V | grep -o 'v[0-9.]*')"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"
python3 "$HERE/compare.py" report "$OUT" "$SIZE_B"
echo "results: $OUT/summary.md, $OUT/compare.png"
