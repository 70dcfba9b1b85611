#!/usr/bin/env bash
# Runs every Bulwark test on this machine, installing and starting what the tests need:
#   - Debian packages for the real file systems the root tests make (xfsprogs, btrfs-progs, ...);
#   - the object-store test servers (Azurite for Azure Blob, an S3-compatible server) on loopback,
#     through tests/servers.sh, stopped again on exit;
#   - then `cargo test --workspace`, with any extra arguments passed on to cargo test;
#   - and at the end, how many tests skipped and why (grouped by reason).
#
# Root tests (loop mounts, fsfreeze) skip when not run as root, unless
# BULWARK_REQUIRE_ROOT_TESTS=1, which makes them fail instead (CI sets it); server tests skip
# without their servers unless BULWARK_REQUIRE_SERVERS=1. Every skip appends "<test>: <reason>"
# to $BULWARK_SKIP_LOG (target/test-skips.log), emptied at the start of each run.
#
# `bash tests/run.sh --prepare` does only the preparation (the packages, the test guests, the
# Debian image, cargo-deb, the test servers' npm/pip installs; no server started, no test run)
# and exits non-zero when a part of it failed. .ci/run runs it in the background while it
# compiles; the full run afterwards finds all of it done (each step is a cached no-op then).
set -euo pipefail
cd "$(dirname "$0")/.."

prepare_only=0
if [ "${1:-}" = --prepare ]; then
    prepare_only=1
    shift
fi
# In --prepare mode a failed step fails the whole preparation (at the end, after the others):
# the caller cannot see the messages among the test output.
prep_failed=()
step_failed() {
    echo "tests/run.sh: $1"
    prep_failed+=("$1")
}

# The machine: packages, test guests, cargo-deb. Skipped under BULWARK_PREPARED=1, which .ci/run
# sets after its own `tests/run.sh --prepare` (these checks take tens of seconds even when all
# is done).
prepare_machine() {
    # tool:package pairs the tests call.
    need=(mkfs.ext4:e2fsprogs e2fsck:e2fsprogs debugfs:e2fsprogs flock:util-linux mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs
          sgdisk:gdisk sfdisk:fdisk fsfreeze:util-linux losetup:mount sha256sum:coreutils sqlite3:sqlite3 zstd:zstd
          qemu-nbd:qemu-utils qemu-io:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin
          /usr/bin/time:time
          lintian:lintian systemd-analyze:systemd man:man-db dpkg-deb:dpkg gzip:gzip
          mmdebstrap:mmdebstrap promtool:prometheus strip:binutils chromium:chromium
          faketime:faketime)
    missing=()
    for pair in "${need[@]}"; do
        tool=${pair%%:*} pkg=${pair##*:}
        command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || [ -x "/sbin/$tool" ] || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        if [ "$(id -u)" = 0 ]; then
            echo "tests/run.sh: installing ${missing[*]}"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "tests/run.sh: missing ${missing[*]} (not root, so not installing: the tests that need them skip)"
        fi
    fi

    # QEMU for the real-guest tests (tests/guest_boot.rs and the QEMU backup tests): Debian 12's
    # qemu-system-x86 7.2. On this machine image it replaces the preinstalled qemu-utils 10.0, so
    # qemu-utils and its companions are pinned to the same 7.2 version (--allow-downgrades). Also
    # busybox-static and Debian's kernel package (downloaded, never installed) for the test guest,
    # which tests/guest/build.sh builds once into target/guest/.
    qemu_ok() {
        command -v qemu-system-x86_64 >/dev/null 2>&1 && command -v busybox >/dev/null 2>&1 \
            && ! ldd "$(command -v busybox)" >/dev/null 2>&1 \
            && [ "$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null)" = "$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null)" ]
    }
    if ! qemu_ok; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq
            qver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2; exit}')
            echo "tests/run.sh: installing qemu-system-x86 $qver (qemu-utils pinned to the same version), busybox-static"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades \
                "qemu-system-x86=$qver" "qemu-system-common=$qver" "qemu-utils=$qver" \
                "qemu-block-extra=$qver" busybox-static libnbd-bin nbdkit >/dev/null
        else
            echo "tests/run.sh: qemu-system-x86 7.2 / busybox-static missing (not root, so not installing: the guest tests skip)"
        fi
    fi
    if qemu_ok; then
        [ -n "$(apt-cache depends linux-image-amd64 2>/dev/null)" ] || { [ "$(id -u)" = 0 ] && apt-get update -qq; } || true
        bash tests/guest/build.sh >/dev/null || step_failed "the test guest did not build (see above)"
        # The Debian guest of tests/debian_guest.rs and tests/guest_postgres.rs (mmdebstrap, root
        # only; with the suite's PostgreSQL server, pgbench and pg_amcheck inside the image, nothing of
        # PostgreSQL on the host; about 5 minutes the first time, cached under
        # target/guest/debian-KEY afterwards).
        if [ "$(id -u)" = 0 ]; then
            bash tests/guest/debian.sh >/dev/null || step_failed "the Debian test guest did not build (see above)"
        fi
    fi

    # tests/packaging.rs builds the Debian packages with the pinned cargo-deb.
    bash packaging/build-debs.sh --install-tool
}
if [ "${BULWARK_PREPARED:-}" != 1 ]; then
    prepare_machine
fi

if [ "$prepare_only" = 1 ]; then
    # The servers' installs only (npm, pip); `start` (below, in the full run) starts them.
    if [ -f tests/servers.sh ]; then
        bash tests/servers.sh install || step_failed "the test servers did not install (see above)"
    fi
    if [ ${#prep_failed[@]} -gt 0 ]; then
        echo "tests/run.sh --prepare: FAILED: ${prep_failed[*]}"
        exit 1
    fi
    echo "tests/run.sh --prepare: done"
    exit 0
fi

if [ -f tests/servers.sh ]; then
    bash tests/servers.sh start
    trap 'bash tests/servers.sh stop || true' EXIT
    # shellcheck disable=SC1091
    [ -f target/test-servers.env ] && set -a && . target/test-servers.env && set +a
fi

export BULWARK_SKIP_LOG="$PWD/target/test-skips.log"
mkdir -p target
: > "$BULWARK_SKIP_LOG"

status=0
cargo test --workspace --no-fail-fast "$@" || status=$?

skips=$(grep -c . "$BULWARK_SKIP_LOG" || true)
echo
if [ "$skips" -gt 0 ]; then
    echo "tests/run.sh: $skips test(s) or parts of tests SKIPPED; this run was NOT complete:"
    # "<test>: <reason>" -> count per reason, then the tests.
    awk -F': ' '{ r = substr($0, length($1) + 3); n[r]++; t[r] = t[r] "\n        " $1 }
                END { for (r in n) printf "  %d x %s%s\n", n[r], r, t[r] }' "$BULWARK_SKIP_LOG"
    echo "  (run as root with BULWARK_REQUIRE_ROOT_TESTS=1 BULWARK_REQUIRE_SERVERS=1 to run them all)"
else
    echo "tests/run.sh: no test skipped."
fi
exit "$status"
