#!/usr/bin/env bash
# Restore throughput from a local vault, the S3 test server (moto) and Azurite, at several
# fetch concurrencies (`restore --concurrency N`).
#
#   bash tests/servers.sh start                     # the object-store test servers
#   bash benches/restore_remote.sh [SIZE_MIB] [CONCURRENCIES...]   # default: 256 1 4 16 32
#
# Uses $BULWARK_BENCH_BIN, else target/release/bulwark-controller when built, else target/debug.
# One random (incompressible) raw image of SIZE_MIB is backed up into each vault (1 MiB blocks),
# then restored once per concurrency; prints MiB/s per vault and concurrency. Everything lives in
# a temporary directory (BULWARK_BENCH_DIR, default /tmp) removed at the end; the bucket and
# container get a fresh prefix per run.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-256}
shift || true
concurrencies=("$@")
[ ${#concurrencies[@]} -gt 0 ] || concurrencies=(1 4 16 32)

B=${BULWARK_BENCH_BIN:-target/release/bulwark-controller}
[ -x "$B" ] || B=target/debug/bulwark-controller
[ -x "$B" ] || { echo "build bulwark-controller first (cargo build --release -p bulwark-controller-bin)" >&2; exit 1; }
env_file=${BULWARK_TEST_SERVERS_ENV:-target/test-servers.env}
[ -f "$env_file" ] || { echo "no $env_file: run bash tests/servers.sh start" >&2; exit 1; }
# shellcheck disable=SC1090
. "$env_file"

work=$(mktemp -d "${BULWARK_BENCH_DIR:-/tmp}/bulwark-restore-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
head -c "$((size << 20))" /dev/urandom >"$work/disk.img"
run_id=bench-$$-$(date +%s)

# S3 (moto): any credentials; Azurite: its well-known development account.
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
export AZURE_STORAGE_USE_EMULATOR=true

declare -A vaults=(
    [local]="$work/vault"
    [s3]="s3://bulwark-test/$run_id"
    [azurite]="az://bulwark-test/$run_id"
)
echo "binary: $B; disk: $size MiB random; block size 1 MiB"
printf '%-8s %12s %10s %10s\n' vault concurrency seconds MiB/s
for name in local s3 azurite; do
    v=${vaults[$name]}
    case $name in
        s3) export AWS_ENDPOINT_URL=$BULWARK_TEST_S3_URL ;;
        azurite) export AZURITE_BLOB_STORAGE_URL=$BULWARK_TEST_AZURITE_URL ;;
    esac
    if ! "$B" backup --vault "$v" --vm bench --disk "os=$work/disk.img" >/dev/null 2>"$work/backup.err"; then
        echo "$name: backup failed: $(tail -3 "$work/backup.err")" >&2
        continue
    fi
    for c in "${concurrencies[@]}"; do
        rm -f "$work/out.img"
        start=$(date +%s.%N)
        "$B" restore --vault "$v" --vm bench --disk os --to "$work/out.img" --concurrency "$c" 2>/dev/null
        end=$(date +%s.%N)
        cmp -s "$work/disk.img" "$work/out.img" || { echo "$name: restore differs" >&2; exit 1; }
        awk -v n="$name" -v c="$c" -v s="$start" -v e="$end" -v m="$size" \
            'BEGIN { t = e - s; printf "%-8s %12d %10.2f %10.1f\n", n, c, t, m / t }'
    done
done
