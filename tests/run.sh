#!/usr/bin/env bash
# Runs every Bulwark test on this machine, installing and starting what the tests need:
#   - Debian packages for the real file systems the root tests make (xfsprogs, btrfs-progs, ...);
#   - the object-store test servers (Azurite for Azure Blob, an S3-compatible server) on loopback,
#     through tests/servers.sh, stopped again on exit;
#   - then `cargo test --workspace`, with any extra arguments passed on to cargo test.
#
# Root tests (loop mounts, fsfreeze) skip when not run as root, unless
# BULWARK_REQUIRE_ROOT_TESTS=1, which makes them fail instead (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

# tool:package pairs the tests call.
need=(mkfs.ext4:e2fsprogs e2fsck:e2fsprogs mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs
      sgdisk:gdisk sfdisk:fdisk fsfreeze:util-linux losetup:mount sha256sum:coreutils sqlite3:sqlite3 zstd:zstd)
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

if [ -f tests/servers.sh ]; then
    bash tests/servers.sh start
    trap 'bash tests/servers.sh stop || true' EXIT
    # shellcheck disable=SC1091
    [ -f target/test-servers.env ] && set -a && . target/test-servers.env && set +a
fi

cargo test --workspace --no-fail-fast "$@"
