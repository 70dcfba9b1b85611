#!/bin/bash
# Regenerates the golden vaults that tests/golden_vault.rs reads. NEVER run this in CI, and
# never to "fix" a failing golden-vault test: the vaults committed here were written by an
# older version, and every later version must still read them (README, "Compatibility").
# Run it only to ADD a golden vault for a new format version, keeping the old ones.
#
#   bash tests/data/golden-vault/regenerate.sh [OUT_DIR]    # default: tests/data/golden-vault
#
# Writes OUT_DIR/plain (a plain vault) and OUT_DIR/encrypted (encrypted, key in
# OUT_DIR/encrypted.key, passphrase below), each with two points of VM "golden", disk "os":
# a 4 MiB + 12345 B image with holes, a partial last block, incompressible and compressible
# blocks; the second point changes some blocks, zeroes one and adds one. expected.txt lists
# each point and the SHA-256 of the image it must restore to.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="${1:-$here}"
PASSPHRASE="golden-vault-passphrase"

if [ -z "${BULWARK_CONTROLLER:-}" ]; then
    (cd "$root" && cargo build --quiet -p bulwark-controller-bin)
    BULWARK_CONTROLLER="${CARGO_TARGET_DIR:-$root/target}/debug/bulwark-controller"
fi
B="$BULWARK_CONTROLLER"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
img="$work/os.img"
blk=65536

write() { # write OFFSET_BLOCKS < data
    dd of="$img" bs="$blk" seek="$1" conv=notrunc status=none
}
truncate -s $((4 * 1024 * 1024 + 12345)) "$img"
head -c $blk /dev/urandom | write 0                                     # block 0: random
{ yes "bulwark golden vault, compressible block" || true; } | head -c $((3 * blk)) | write 16   # 16-18: text
printf 'the partial last block' | dd of="$img" bs=1 seek=$((4 * 1024 * 1024 + 100)) conv=notrunc status=none

rm -rf "$out/plain" "$out/encrypted" "$out/encrypted.key" "$out/expected.txt"
mkdir -p "$out"
export BULWARK_PASSPHRASE="$PASSPHRASE"
"$B" key create --key-file "$out/encrypted.key" --passphrase-env BULWARK_PASSPHRASE
"$B" init --vault "$out/plain" --block-size 64KiB
"$B" init --vault "$out/encrypted" --block-size 64KiB --encrypt --key-file "$out/encrypted.key"

{
    echo "# Written by regenerate.sh with $("$B" --version). Lines: VAULT POINT_ID DISK SHA256."
} > "$out/expected.txt"

backup() { # backup N
    local sum
    sum="$(sha256sum "$img" | cut -d' ' -f1)"
    for vault in plain encrypted; do
        local key=()
        [ "$vault" = encrypted ] && key=(--key-file "$out/encrypted.key")
        local id
        id="$("$B" "${key[@]}" backup --vault "$out/$vault" --vm golden --disk "os=$img" \
            --snapshot copy --snapshot-dir "$work/snapshots" --no-change-tracking)"
        echo "$vault $id os $sum" >> "$out/expected.txt"
    done
}
backup
{ yes "changed in the second point" || true; } | head -c $blk | write 17            # changed block
head -c $blk /dev/zero | write 0                                        # data -> zeroes
head -c $blk /dev/urandom | write 40                                    # new block in a hole
sleep 1.1                                                               # distinct point times
backup
cat "$out/expected.txt"
du -sh "$out/plain" "$out/encrypted"
