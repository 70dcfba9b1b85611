#!/bin/sh
# mmdebstrap customize hook of tests/guest/debian.sh: $1 is the new root. Makes the guest boot
# fast under TCG on a serial console: the command channel, no getty/logind/timers, a fixed
# machine id (no first-boot setup), an empty fstab (the initramfs mounts / read-write).
set -eu
r=$1
here=$(dirname "$0")
install -m 0755 "$here/../cmdloop" "$r/usr/local/sbin/bulwark-cmdloop"
install -m 0755 "$here/usleep" "$r/usr/local/bin/usleep"
install -m 0644 "$here/bulwark-cmd.service" "$r/etc/systemd/system/bulwark-cmd.service"
echo debian-guest >"$r/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 debian-guest\n' >"$r/etc/hosts"
echo 'b01a4cde0000400080000000000000aa' >"$r/etc/machine-id"
printf '# / is mounted read-write by the initramfs; test disks are added by the tests.\n' >"$r/etc/fstab"
systemctl --root="$r" set-default multi-user.target
systemctl --root="$r" enable bulwark-cmd.service
# Nothing to log in on, nothing periodic, no D-Bus for logind.
systemctl --root="$r" mask getty.target serial-getty@ttyS0.service getty@tty1.service \
    console-getty.service systemd-logind.service systemd-firstboot.service \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer systemd-tmpfiles-clean.timer \
    systemd-update-utmp.service systemd-update-utmp-runlevel.service \
    systemd-remount-fs.service systemd-fsck-root.service systemd-pstore.service \
    systemd-hwdb-update.service ldconfig.service >/dev/null 2>&1
# Each unit costs about a second under a loaded TCG: none that this guest does not need (no
# kernel modules on the root, nothing persistent to seed, no binfmt, no extra API mounts).
systemctl --root="$r" mask systemd-random-seed.service systemd-journal-flush.service \
    modprobe@.service systemd-modules-load.service kmod-static-nodes.service \
    dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
    sys-kernel-config.mount sys-fs-fuse-connections.mount proc-sys-fs-binfmt_misc.automount \
    systemd-binfmt.service systemd-user-sessions.service systemd-update-done.service \
    systemd-sysusers.service systemd-journal-catalog-update.service \
    systemd-machine-id-commit.service >/dev/null 2>&1
mkdir -p "$r/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nForwardToConsole=no\n' >"$r/etc/systemd/journald.conf.d/bulwark.conf"
# PostgreSQL (tests/guest_postgres.rs): the package's default cluster and its service are
# dropped (nothing starts at boot); instead an initdb'd cluster (C locale, local trust, no TCP,
# small WAL) waits in /var/lib/postgresql/bulwark-template for the test to copy onto a disk of
# its own; /usr/local/lib/bulwark-pg-bin links to the version's bin directory. initdb runs here,
# at native speed, once per image instead of in the TCG guest at every test.
for bin in "$r"/usr/lib/postgresql/*/bin; do
    [ -x "$bin/initdb" ] || continue
    ver=$(basename "$(dirname "$bin")")
    rm -rf "$r/etc/postgresql/$ver" "$r/var/lib/postgresql/$ver"
    ln -sfn "/usr/lib/postgresql/$ver/bin" "$r/usr/local/lib/bulwark-pg-bin"
    chroot "$r" runuser -u postgres -- "/usr/lib/postgresql/$ver/bin/initdb" --no-sync -A trust \
        --locale=C -E UTF8 -D /var/lib/postgresql/bulwark-template >/dev/null
    cat >>"$r/var/lib/postgresql/bulwark-template/postgresql.conf" <<'EOF'
# tests/guest/debian/customize.sh
listen_addresses = ''
unix_socket_directories = '/run/postgresql'
shared_buffers = 32MB
max_wal_size = 96MB
min_wal_size = 32MB
log_checkpoints = on
EOF
done
systemctl --root="$r" mask postgresql.service >/dev/null 2>&1 || true
# Test image: no root password (nothing listens for logins).
rm -rf "$r"/var/cache/apt/*.bin "$r"/var/lib/apt/lists/*_Packages "$r"/var/log/*.log
