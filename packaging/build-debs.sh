#!/bin/bash
# Builds the two Debian packages, bulwark-controller and bulwark-agent, into target/debian/.
#
#   bash packaging/build-debs.sh                 # release build (what you ship)
#   bash packaging/build-debs.sh --profile dev   # reuse the debug build (CI's quick check)
#   bash packaging/build-debs.sh --out DIR       # write the .deb files to DIR
#   bash packaging/build-debs.sh --install-tool  # only install the pinned cargo-deb (tests/run.sh)
#   bash packaging/build-debs.sh --only agent    # only one package (agent or controller)
#
# Installs the pinned cargo-deb when it is missing, builds both binaries, generates their man
# pages and shell completions from the clap definitions (the hidden `generate-assets` command),
# then packages each with `cargo deb --no-build`. Prints the paths of the two .deb files.
set -euo pipefail

CARGO_DEB_VERSION=3.8.0
profile=release
out=""
install_only=false
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
        --profile=*) profile="${1#--profile=}"; shift ;;
        --install-tool) install_only=true; shift ;;
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --only) only="${2:?--only needs agent or controller}"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "build-debs.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

case "$only" in
    "") names=(controller agent) ;;
    agent|controller) names=("$only") ;;
    *) echo "build-debs.sh: --only takes agent or controller, not $only" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
fast=()
case "$profile" in
    # A check build: lighter compression (cargo-deb --fast) for its 100 MB of debug binaries.
    dev|debug) profile_dir=debug; fast=(--fast) ;;
    *) profile_dir="$profile" ;;
esac

if [ "$(cargo deb --version 2>/dev/null || true)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    echo "build-debs.sh: installing cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi
$install_only && exit 0

# Both binaries even for --only: building one package alone unifies the dependencies' features
# differently, and would rebuild them (and the other binary next time).
cargo build --profile "$profile" -p bulwark-controller-bin -p bulwark-agent-bin

assets="$target/$profile_dir/bulwark-assets"
for n in "${names[@]}"; do
    rm -rf "${assets:?}/$n"
    "$target/$profile_dir/bulwark-$n" generate-assets --out "$assets/$n"
    # Debian ships man pages gzipped (-n: no time stamp, for reproducible packages).
    gzip -9n "$assets/$n"/man/*
done

out="${out:-$target/debian}"
mkdir -p "$out"
for n in "${names[@]}"; do
    # --no-build: the binaries and generated assets above are what gets packaged.
    cargo deb --no-build "${fast[@]}" --profile "$profile" -p "bulwark-$n-bin" --output "$out"
done
ver="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
arch="$(dpkg --print-architecture)"
for name in "${names[@]/#/bulwark-}"; do
    deb="$out/${name}_${ver}-1_${arch}.deb"
    [ -f "$deb" ] || { echo "build-debs.sh: $deb was not built" >&2; exit 1; }
    echo "$deb"
done
