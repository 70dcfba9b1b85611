#!/usr/bin/env bash
# Object-store test servers on loopback: Azurite (Azure Blob, from the npm registry) and moto's
# S3 server (from PyPI), each on a free 127.0.0.1 port.
#
#   bash tests/servers.sh start    install if needed, start (idempotent), wait until ready,
#                                  create the shared test container and bucket, write the env file
#   bash tests/servers.sh install  only the installs `start` does when needed (npm, pip), no server
#                                  started (tests/run.sh --prepare); fails like `start`
#   bash tests/servers.sh stop     stop the servers this script started (by their pid files)
#   bash tests/servers.sh status   print the env file if both servers answer; exit 1 otherwise
#   bash tests/servers.sh azure-container URL NAME   create a container on an Azurite at URL
#
# The env file (target/test-servers.env, or $BULWARK_TEST_SERVERS_ENV) holds:
#   BULWARK_TEST_AZURITE_URL   http://127.0.0.1:PORT          (account devstoreaccount1, its well-known key)
#   BULWARK_TEST_S3_URL        http://127.0.0.1:PORT          (any access key id / secret)
#   BULWARK_TEST_AZURITE_BIN   the azurite-blob program, for tests that start and kill their own
#   BULWARK_TEST_SERVERS_SH    this script (tests call `azure-container` through it)
# Tests read these variables (or, when unset, this file) and skip without them, unless
# BULWARK_REQUIRE_SERVERS=1. State, logs and data live in target/test-servers/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${BULWARK_TEST_SERVERS_DIR:-$ROOT/target/test-servers}
ENV_FILE=${BULWARK_TEST_SERVERS_ENV:-$ROOT/target/test-servers.env}
AZURITE_VERSION=3.35.0 # the newest release that runs on Node 20
AZURITE_BIN=$DIR/node/node_modules/.bin/azurite-blob
TEST_BUCKET=bulwark-test
PY=python3 # the Python that has moto (see install)
mkdir -p "$DIR"

log() { echo "tests/servers.sh: $*" >&2; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# True when something listens at the http://HOST:PORT URL (bash's /dev/tcp: no curl needed).
answers() {
    local hp=${1#http://}
    hp=${hp%%/*}
    timeout 2 bash -c "exec 3<>/dev/tcp/${hp%:*}/${hp##*:}" 2>/dev/null
}

wait_ready() { # url name pidfile
    for _ in $(seq 1 120); do
        if answers "$1"; then return 0; fi
        if ! alive "$3"; then log "$2 exited; see $DIR/$2.log"; tail -20 "$DIR/$2.log" >&2 || true; return 1; fi
        sleep 0.5
    done
    log "$2 did not answer at $1 within 60 s"
    return 1
}

install() {
    if [ ! -x "$AZURITE_BIN" ]; then
        command -v npm >/dev/null || { log "npm is needed for Azurite"; return 1; }
        log "installing azurite@$AZURITE_VERSION"
        mkdir -p "$DIR/node"
        (cd "$DIR/node" && npm install --prefix . "azurite@$AZURITE_VERSION" --no-audit --no-fund --loglevel=error >"$DIR/npm-install.log" 2>&1) \
            || { log "npm install failed; see $DIR/npm-install.log"; return 1; }
    fi
    # moto from the python3 on PATH if it has it, else from a venv of our own (a system
    # Python refuses `pip install` outside a venv).
    local mods='import moto.server, flask, flask_cors, boto3'
    if python3 -c "$mods" 2>/dev/null; then
        PY=python3
    else
        PY=$DIR/venv/bin/python
        if ! "$PY" -c "$mods" 2>/dev/null; then
            log "installing moto[server] into $DIR/venv"
            { python3 -m venv "$DIR/venv" && "$PY" -m pip install -q 'moto[server]' boto3; } \
                >"$DIR/pip-install.log" 2>&1 \
                || { log "pip install failed; see $DIR/pip-install.log"; return 1; }
        fi
    fi
}

# Creates a blob container on an Azurite (SharedKey-signed with the well-known dev key).
azure_container() { # url name
    python3 - "$1" "$2" <<'PY'
import base64, hashlib, hmac, sys, urllib.request, urllib.error
from email.utils import formatdate
url, name = sys.argv[1].rstrip("/"), sys.argv[2]
acct = "devstoreaccount1"
key = base64.b64decode("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
date, ver = formatdate(usegmt=True), "2021-08-06"
sts = "\n".join(["PUT", "", "", "", "", "", "", "", "", "", "", "",
                 f"x-ms-date:{date}\nx-ms-version:{ver}", f"/{acct}/{acct}/{name}\nrestype:container"])
sig = base64.b64encode(hmac.new(key, sts.encode(), hashlib.sha256).digest()).decode()
req = urllib.request.Request(f"{url}/{acct}/{name}?restype=container", method="PUT", headers={
    "x-ms-date": date, "x-ms-version": ver, "Authorization": f"SharedKey {acct}:{sig}", "Content-Length": "0"})
try:
    urllib.request.urlopen(req, timeout=10)
except urllib.error.HTTPError as e:
    if e.code != 409:  # 409: exists already
        sys.exit(f"creating container {name}: HTTP {e.code} {e.read()[:300]!r}")
PY
}

s3_bucket() { # url name
    "$PY" - "$1" "$2" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
try:
    s3.create_bucket(Bucket=sys.argv[2])
except s3.exceptions.BucketAlreadyOwnedByYou:
    pass
PY
}

start_azurite() {
    local pidf=$DIR/azurite.pid portf=$DIR/azurite.port
    if alive "$pidf" && [ -f "$portf" ] && answers "http://127.0.0.1:$(cat "$portf")"; then return 0; fi
    local port; port=$(free_port)
    # Test data is disposable: a fresh start begins empty.
    rm -rf "$DIR/azurite-data"
    mkdir -p "$DIR/azurite-data"
    setsid "$AZURITE_BIN" --blobHost 127.0.0.1 --blobPort "$port" --location "$DIR/azurite-data" \
        --skipApiVersionCheck --loose --silent >"$DIR/azurite.log" 2>&1 < /dev/null &
    echo $! >"$pidf"
    echo "$port" >"$portf"
    wait_ready "http://127.0.0.1:$port" azurite "$pidf" || return 1
    log "Azurite on 127.0.0.1:$port"
}

start_s3() {
    local pidf=$DIR/s3.pid portf=$DIR/s3.port
    if alive "$pidf" && [ -f "$portf" ] && answers "http://127.0.0.1:$(cat "$portf")"; then return 0; fi
    local port; port=$(free_port)
    setsid "$PY" -m moto.server -H 127.0.0.1 -p "$port" >"$DIR/s3.log" 2>&1 < /dev/null &
    echo $! >"$pidf"
    echo "$port" >"$portf"
    wait_ready "http://127.0.0.1:$port" s3 "$pidf" || return 1
    log "S3 (moto) on 127.0.0.1:$port"
}

write_env() {
    cat >"$ENV_FILE.tmp" <<EOF
BULWARK_TEST_AZURITE_URL=http://127.0.0.1:$(cat "$DIR/azurite.port")
BULWARK_TEST_S3_URL=http://127.0.0.1:$(cat "$DIR/s3.port")
BULWARK_TEST_AZURITE_BIN=$AZURITE_BIN
BULWARK_TEST_SERVERS_SH=$ROOT/tests/servers.sh
EOF
    mv "$ENV_FILE.tmp" "$ENV_FILE"
}

stop_one() {
    local pidf=$DIR/$1.pid
    if alive "$pidf"; then
        local pid; pid=$(cat "$pidf")
        # setsid made it a process group leader: end the group (node may have children).
        kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 -- "-$pid" 2>/dev/null || true
        log "stopped $1"
    fi
    rm -f "$pidf" "$DIR/$1.port"
}

# Each step checked explicitly: `set -e` does not apply inside an `if` condition.
start_all() {
    install || return 1
    start_azurite || return 1
    start_s3 || return 1
    azure_container "http://127.0.0.1:$(cat "$DIR/azurite.port")" "$TEST_BUCKET" || return 1
    s3_bucket "http://127.0.0.1:$(cat "$DIR/s3.port")" "$TEST_BUCKET" || return 1
    write_env
}

case "${1:-}" in
start)
    # Without the servers the tests that need them skip, unless BULWARK_REQUIRE_SERVERS=1 (CI):
    # then failing to start them fails here.
    if ! (start_all); then
        stop_one azurite
        stop_one s3
        rm -f "$ENV_FILE"
        if [ "${BULWARK_REQUIRE_SERVERS:-}" = 1 ]; then
            log "could not start the test servers (BULWARK_REQUIRE_SERVERS=1)"
            exit 1
        fi
        log "could not start the test servers: the tests that need them will skip"
        exit 0
    fi
    cat "$ENV_FILE"
    ;;
install)
    if ! (install); then
        if [ "${BULWARK_REQUIRE_SERVERS:-}" = 1 ]; then
            log "could not install the test servers (BULWARK_REQUIRE_SERVERS=1)"
            exit 1
        fi
        log "could not install the test servers: the tests that need them will skip"
    fi
    ;;
stop)
    stop_one azurite
    stop_one s3
    rm -f "$ENV_FILE"
    ;;
status)
    alive "$DIR/azurite.pid" && alive "$DIR/s3.pid" && [ -f "$ENV_FILE" ] && cat "$ENV_FILE"
    ;;
azure-container)
    azure_container "$2" "$3"
    ;;
*)
    echo "usage: $0 start|install|stop|status|azure-container URL NAME" >&2
    exit 2
    ;;
esac
