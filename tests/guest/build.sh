#!/usr/bin/env bash
# Builds the Bulwark test guest: Debian's kernel (linux-image-amd64, extracted, never installed)
# plus a small initramfs with busybox-static, the virtio/ext4/network modules, an init that starts
# a command channel on a virtio-serial port, and any host binaries given with --add (each with the
# shared libraries `ldd` lists).
#
#   tests/guest/build.sh [--add HOST_PATH[:GUEST_PATH]]...
#
# Prints the directory that holds `vmlinuz`, `initrd.gz` and (when the kernel could be unpacked)
# `vmlinux`, the uncompressed kernel that QEMU boots faster, on its last line of standard output.
# Everything is cached under target/guest/, keyed by a hash of the inputs, so a second call with the
# same inputs only hashes them. See tests/guest/README.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${BULWARK_GUEST_CACHE:-$root/target/guest}
mkdir -p "$cache"

log() { echo "guest/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

adds=()
while [ $# -gt 0 ]; do
    case $1 in
        --add) [ $# -ge 2 ] || die "--add needs HOST_PATH[:GUEST_PATH]"; adds+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done

# One build at a time per cache (tests in parallel processes share it).
exec 9>"$cache/.lock"
flock 9

# The modules the guest loads, with their dependencies resolved from modules.dep.
# crc32c_generic provides the crc32c that ext4 (and jbd2) ask for by name (a softdep).
modules=(virtio_pci virtio_blk virtio_console virtio_net crc32c_generic ext4)

# ---- 1. kernel and modules, keyed by the Debian package version --------------------------------
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || die "apt knows no linux-image-amd64 (run apt-get update first)"
kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2; exit}')
[ -n "$kver" ] && [ "$kver" != "(none)" ] || die "no candidate version of $kpkg"
kid=$(printf '%s_%s_%s_pvh' "$kpkg" "$kver" "${modules[*]}" | sha256sum | cut -c1-16)
kdir=$cache/kernel-$kid
if [ ! -f "$kdir/done" ]; then
    log "fetching $kpkg $kver (apt-get download; extracted, not installed)"
    work=$(mktemp -d "$cache/tmp.kernel.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download -q "$kpkg=$kver" >/dev/null 2>&1) || die "apt-get download $kpkg=$kver failed"
    dpkg -x "$work"/*.deb "$work/x"
    krel=$(basename "$(ls -d "$work"/x/lib/modules/*)")
    # busybox's depmod writes modules.dep (the .deb ships none; kmod may not be installed).
    busybox depmod -b "$work/x" "$krel"
    mdir=$work/x/lib/modules/$krel
    mkdir -p "$work/out/modules"
    cp "$work/x/boot/vmlinuz-$krel" "$work/out/vmlinuz"
    # The uncompressed ELF kernel: QEMU boots it directly through its PVH entry point, which
    # skips the firmware's real-mode loader and the xz decompression (about half the boot's
    # CPU time under TCG). Falls back to vmlinuz when the image is not xz-compressed.
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$work/out/vmlinuz" | head -1 | cut -d: -f1 || true)
    if [ -n "$off" ]; then
        tail -c +$((off + 1)) "$work/out/vmlinuz" | xz -dcq >"$work/out/vmlinux" 2>/dev/null || true
        head -c 4 "$work/out/vmlinux" | grep -q ELF || rm -f "$work/out/vmlinux"
    fi
    declare -A seen=()
    order=()
    resolve() { # path relative to $mdir
        local rel=$1 deps d i
        [ -n "${seen[$rel]:-}" ] && return 0
        seen[$rel]=1
        deps=$(awk -v m="$rel:" '$1 == m { $1 = ""; print; exit }' "$mdir/modules.dep")
        # modules.dep lists the deepest dependency last: load from the end.
        read -r -a d <<<"$deps"
        for ((i = ${#d[@]} - 1; i >= 0; i--)); do resolve "${d[i]}"; done
        order+=("$rel")
    }
    for m in "${modules[@]}"; do
        rel=$(awk -F: -v m="$m" '{ n = $1; sub(/.*\//, "", n); sub(/\.ko(\.[a-z]+)?$/, "", n); gsub(/-/, "_", n) }
                                  n == m { print $1; exit }' "$mdir/modules.dep")
        if [ -z "$rel" ]; then
            grep -q "/$m.ko" "$mdir/modules.builtin" 2>/dev/null && continue
            die "module $m is in neither modules.dep nor modules.builtin of $krel"
        fi
        resolve "$rel"
    done
    : >"$work/out/modules.load"
    for rel in "${order[@]}"; do
        name=$(basename "$rel"); name=${name%.ko*}
        case $rel in
            *.ko) cp "$mdir/$rel" "$work/out/modules/$name.ko" ;;
            *.ko.xz) xz -dc "$mdir/$rel" >"$work/out/modules/$name.ko" ;;
            *.ko.zst) zstd -qdc "$mdir/$rel" >"$work/out/modules/$name.ko" ;;
            *) die "unknown module file $rel" ;;
        esac
        echo "$name" >>"$work/out/modules.load"
    done
    echo "$krel" >"$work/out/release"
    rm -rf "$kdir"
    mv "$work/out" "$kdir"
    touch "$kdir/done"
    rm -rf "$work"
    trap - EXIT
    log "kernel $krel with modules: $(tr '\n' ' ' <"$kdir/modules.load")"
fi

# ---- 2. base initramfs: busybox, modules, init ------------------------------------------------
busybox=$(command -v busybox) || die "busybox is not installed (apt-get install busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked; install busybox-static"
fi
bid=$( (echo "$kid"; sha256sum "$busybox" "$here/init" "$here/rc" "$here/cmdloop" "$here/inittab" "$0" | cut -d' ' -f1) | sha256sum | cut -c1-16)
bdir=$cache/base-$bid
if [ ! -f "$bdir/done" ]; then
    log "building the base initramfs $bdir"
    work=$(mktemp -d "$cache/tmp.base.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    s=$work/root
    mkdir -p "$s"/{bin,sbin,usr/bin,usr/sbin,etc/bulwark,lib/modules,proc,sys,dev,run,tmp,mnt,root}
    cp "$busybox" "$s/bin/busybox"
    ln -s busybox "$s/bin/sh"
    install -m 0755 "$here/init" "$s/init"
    install -m 0755 "$here/rc" "$here/cmdloop" "$s/etc/bulwark/"
    cp "$here/inittab" "$s/etc/inittab"
    cp "$kdir"/modules/*.ko "$s/lib/modules/"
    cp "$kdir/modules.load" "$s/etc/bulwark/modules.load"
    echo "root:x:0:0:root:/root:/bin/sh" >"$s/etc/passwd"
    echo "root:x:0:" >"$s/etc/group"
    (cd "$s" && find . | LC_ALL=C sort | busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -6) >"$work/base.cpio.gz"
    mkdir -p "$work/out"
    mv "$work/base.cpio.gz" "$work/out/"
    cp "$kdir/vmlinuz" "$work/out/vmlinuz"
    [ -f "$kdir/vmlinux" ] && ln "$kdir/vmlinux" "$work/out/vmlinux" 2>/dev/null || { [ -f "$kdir/vmlinux" ] && cp "$kdir/vmlinux" "$work/out/vmlinux"; }
    rm -rf "$bdir"
    mv "$work/out" "$bdir"
    touch "$bdir/done"
    rm -rf "$work"
    trap - EXIT
fi

# ---- 3. the image: base + host binaries (concatenated cpio archives) --------------------------
specs=()
for a in "${adds[@]}"; do
    host=${a%%:*}
    guest=${a#*:}
    [ "$guest" = "$a" ] && guest=/bin/$(basename "$host")
    [ -f "$host" ] || die "--add: $host is not a file"
    case $guest in /*) ;; *) die "--add: guest path $guest must be absolute" ;; esac
    specs+=("$host" "$guest")
done
iid=$( (echo "$bid"
        for ((i = 0; i < ${#specs[@]}; i += 2)); do
            echo "${specs[i+1]} $(sha256sum "${specs[i]}" | cut -d' ' -f1)"
        done) | sha256sum | cut -c1-16)
idir=$cache/img-$iid
if [ ! -f "$idir/done" ]; then
    work=$(mktemp -d "$cache/tmp.img.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    s=$work/root
    mkdir -p "$s"
    for ((i = 0; i < ${#specs[@]}; i += 2)); do
        host=${specs[i]} guest=${specs[i+1]}
        mkdir -p "$s$(dirname "$guest")"
        cp -L "$host" "$s$guest"
        chmod 0755 "$s$guest"
        # The shared libraries it needs (and the dynamic loader), at the paths ldd names.
        if ldd "$host" >"$work/ldd" 2>/dev/null; then
            awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]+ \(/ { print $1 }' "$work/ldd" | while read -r lib; do
                mkdir -p "$s$(dirname "$lib")"
                cp -L "$lib" "$s$lib"
            done
        fi
    done
    cp "$bdir/base.cpio.gz" "$work/initrd.gz"
    if [ ${#specs[@]} -gt 0 ]; then
        (cd "$s" && find . -mindepth 1 | LC_ALL=C sort | busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -6) >>"$work/initrd.gz"
    fi
    mkdir -p "$work/out"
    mv "$work/initrd.gz" "$work/out/"
    cp "$bdir/vmlinuz" "$work/out/vmlinuz"
    [ -f "$bdir/vmlinux" ] && ln "$bdir/vmlinux" "$work/out/vmlinux" 2>/dev/null || { [ -f "$bdir/vmlinux" ] && cp "$bdir/vmlinux" "$work/out/vmlinux"; }
    rm -rf "$idir"
    mv "$work/out" "$idir"
    touch "$idir/done"
    rm -rf "$work"
    trap - EXIT
    log "built $idir ($(du -h "$idir/initrd.gz" | cut -f1) initramfs)"
fi
# Drop cache entries unused for 3 days (every rebuilt binary makes a new img-*).
touch "$idir/done" "$bdir/done" "$kdir/done"
find "$cache" -mindepth 2 -maxdepth 2 -name done -mtime +3 -printf '%h\n' 2>/dev/null | xargs -r rm -rf
echo "$idir"
