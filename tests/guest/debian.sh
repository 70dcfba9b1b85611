#!/usr/bin/env bash
# Builds the Debian test guest: a minimal Debian root file system (mmdebstrap --variant=minbase
# plus systemd, udev, e2fsprogs and the PostgreSQL server of the suite, of the suite the host's apt
# sources give, e.g. postgresql-15 on Debian 12) in a raw ext4 image,
# booted with Debian's kernel and a small initramfs (tests/guest/build.sh's, with
# tests/guest/debian/init as /init: it loads the virtio/ext4 modules and switch_roots to the disk
# whose serial is "root", where systemd runs as PID 1). Needs root and mmdebstrap.
#
#   tests/guest/debian.sh
#
# Prints, on its last line of standard output, the directory holding `root.img` (raw ext4, use
# it read-only: give each guest a qcow2 overlay), `vmlinux` or `vmlinuz`, and `initrd.gz`.
# Cached under target/guest/debian-KEY, KEY a hash of the inputs (these scripts, the suite, the
# package list, the candidate versions of the main packages, the kernel and initramfs), so a
# second call with the same inputs only hashes them. See tests/guest/README.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${BULWARK_GUEST_CACHE:-$root/target/guest}
mkdir -p "$cache"

log() { echo "guest/debian.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap in root mode, mkfs.ext4 -d with owners)"
command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (apt-get install mmdebstrap)"

# The kernel and an initramfs whose /init boots the Debian root.
kdir=$(bash "$here/build.sh" --add "$here/debian/init:/init" | tail -n1)
[ -f "$kdir/initrd.gz" ] || die "tests/guest/build.sh gave no initramfs"

suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$suite" ] || die "no VERSION_CODENAME in /etc/os-release"
sources=$(ls /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1 || true)
[ -n "$sources" ] || die "no apt sources on the host"
# PostgreSQL for tests/guest_postgres.rs: the suite's major version (Debian 12: 15) through the
# `postgresql` metapackage's dependency, named explicitly so that the cache key follows it.
pg=$(apt-cache depends postgresql 2>/dev/null | awk '/Depends: postgresql-[0-9]+$/ {print $2; exit}')
[ -n "$pg" ] || die "apt knows no postgresql-NN package (run apt-get update first)"
packages=systemd,systemd-sysv,udev,e2fsprogs,$pg
versions=$(apt-cache policy systemd udev e2fsprogs libc6 apt "$pg" 2>/dev/null | awk '/^[a-z]/ {p=$1} /Candidate:/ {print p, $2}')
[ -n "$versions" ] || die "apt knows none of the guest's packages (run apt-get update first)"
size_mib=1024

key=$( (echo "$suite $packages $size_mib"; echo "$versions"; basename "$kdir"
        sha256sum "$0" "$here/debian/customize.sh" "$here/debian/bulwark-cmd.service" \
            "$here/debian/usleep" "$here/cmdloop" "$sources" | cut -d' ' -f1) | sha256sum | cut -c1-16)
out=$cache/debian-$key

exec 9>"$cache/.debian.lock"
flock 9
if [ ! -f "$out/done" ]; then
    log "building the $suite guest image $out (mmdebstrap minbase + $packages)"
    started=$(date +%s)
    work=$(mktemp -d "$cache/tmp.debian.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    # Documentation, man pages and translations are left out (--dpkgopt path-exclude).
    mmdebstrap --variant=minbase --include="$packages" --mode=root --format=directory \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook="'$here/debian/customize.sh' \"\$1\"" \
        --quiet "$suite" "$work/root" "$sources" >&2 || die "mmdebstrap failed"
    mkdir -p "$work/out"
    truncate -s "${size_mib}M" "$work/out/root.img"
    mkfs.ext4 -q -F -L bulwark-root -d "$work/root" "$work/out/root.img" || die "mkfs.ext4 -d failed"
    for f in vmlinux vmlinuz initrd.gz; do
        [ -f "$kdir/$f" ] && { ln "$kdir/$f" "$work/out/$f" 2>/dev/null || cp "$kdir/$f" "$work/out/$f"; }
    done
    rm -rf "$out"
    mv "$work/out" "$out"
    touch "$out/done"
    rm -rf "$work"
    trap - EXIT
    log "built $out in $(($(date +%s) - started)) s ($(du -h "$out/root.img" | cut -f1) used of ${size_mib} MiB)"
fi
touch "$out/done"
# Drop older Debian images unused for 3 days.
find "$cache" -mindepth 2 -maxdepth 2 -path '*/debian-*/done' -mtime +3 -printf '%h\n' 2>/dev/null | xargs -r rm -rf
echo "$out"
