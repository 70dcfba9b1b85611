#!/usr/bin/env python3
"""Load on the daemon's HTTP API while it runs backups (issue 15).

    python3 benches/api_load.py [--bin target/debug/bulwark-controller] [--clients 200]
                                [--seconds 30] [--vms 4] [--disk-mib 64] [--port 21420]
                                [--client python|wrk] [--rounds 2] [--idle-rounds 0]

Plain-file disks (random data, rewritten in part every few seconds so every backup has
work), a daemon (`serve`) backing every VM up every 10 s (`schedule_override_seconds`), an
operator token from `token create`. Then CLIENTS concurrent keep-alive HTTP/1.1 clients (one
asyncio task each, one connection each) request the read endpoints round-robin for SECONDS.

Printed: per endpoint the request count and p50/p99/max latency (request written to the last
body byte read, as the client saw it: the client's own event loop is part of it), errors; the
daemon's RSS before (after a warm-up round) and after each round (with its anonymous part,
threads and glibc malloc arenas: a growth that stops across rounds is the allocator's
high-water mark, one that goes on is a leak);
the jobs run meanwhile with their states, and `verify` of the vault afterwards (exit 0: every
committed point restores). Runs as any user; root is not needed (plain files).
"""

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ENDPOINTS = [
    "/healthz",
    "/api/v1/vms",
    "/api/v1/vms/{vm}",
    "/api/v1/vms/{vm}/points",
    "/api/v1/jobs?limit=50",
    "/api/v1/storage",
    "/api/v1/policies",
    "/api/v1/leases",
    "/metrics",
]

POLICY = ('{ time_zone = "UTC", schedule = { frequency = "daily", times = ["02:00"] }, '
          'retention = { daily = 3 }, consistency = { wanted = "crash", minimum = "crash" } }')


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def heap_arenas(pid):
    """glibc malloc arenas besides the main one: each is a 64 MiB-aligned anonymous mapping
    reserved whole (its used part rw-p, the rest ---p), so count the 64 MiB reservations."""
    n = 0
    with open(f"/proc/{pid}/maps") as f:
        rows = [l.split() for l in f]
    for i, r in enumerate(rows):
        lo, hi = (int(x, 16) for x in r[0].split("-"))
        if len(r) == 5 and r[1] == "rw-p" and lo % (64 << 20) == 0:
            end = hi
            if i + 1 < len(rows) and len(rows[i + 1]) == 5 and rows[i + 1][1] == "---p":
                end = int(rows[i + 1][0].split("-")[1], 16)
            if end - lo == 64 << 20:
                n += 1
    return n


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


async def client(port, token, paths, deadline, stats, errors):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = random.randrange(len(paths))
    try:
        while time.monotonic() < deadline:
            key, path = paths[i % len(paths)]
            i += 1
            req = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: Bearer {token}\r\n\r\n").encode()
            t0 = time.monotonic()
            writer.write(req)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = 0
            chunked = False
            for l in lines[1:]:
                k, _, v = l.partition(":")
                if k.lower() == "content-length":
                    length = int(v.strip())
                if k.lower() == "transfer-encoding" and "chunked" in v.lower():
                    chunked = True
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            else:
                await reader.readexactly(length)
            dt = time.monotonic() - t0
            if status != 200:
                errors.append(f"{path}: HTTP {status}")
            stats.setdefault(key, []).append(dt)
    except Exception as e:  # a broken connection is an error of the run
        errors.append(f"connection: {e!r}")
    finally:
        writer.close()


async def load(port, token, vms, clients, seconds):
    stats, errors = {}, []
    paths = [(e, e.replace("{vm}", vm)) for e in ENDPOINTS for vm in vms]
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client(port, token, paths, deadline, stats, errors)
                           for _ in range(clients)))
    return stats, errors


WRK_SCRIPT = """
local paths = {%s}
local token = "%s"
local i = math.random(#paths)
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1], {["Authorization"] = "Bearer " .. token})
end
"""


async def load_wrk(port, token, vms, clients, seconds, work):
    """The same round with `wrk` (C, one event loop per thread) as the client: the Python
    client tops out near 800 requests/s, so with 200 clients its own queueing dominates the
    latency it reports. Returns wrk's summary: latency percentiles over all read endpoints
    (wrk does not split them), requests, errors."""
    paths = [e.replace("{vm}", vm) for e in ENDPOINTS for vm in vms]
    script = os.path.join(work, "load.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT % (", ".join(json.dumps(x) for x in paths), token))
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t2", f"-c{clients}", f"-d{seconds}s", "--timeout", "10s", "--latency",
        "-s", script, f"http://127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE)
    out = (await proc.communicate())[0].decode()
    summary = {"raw": out, "errors": []}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        t = line.split()
        if t[:2] == ["Latency", "Distribution"]:
            for row in lines[i + 1:i + 5]:
                q, v = row.split()
                summary[q] = v
        elif t and t[0] == "Non-2xx":
            summary["errors"].append(line.strip())
        elif t and t[0] == "Socket":
            summary["errors"].append(line.strip())
        elif len(t) > 2 and t[1] == "requests":
            summary["requests"] = int(t[0])
    return summary


def http_json(port, token, path):
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/bulwark-controller")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--disk-mib", type=int, default=64)
    ap.add_argument("--port", type=int, default=21420)
    ap.add_argument("--rounds", type=int, default=2,
                    help="load rounds after the warm-up (the first with --client's client, the "
                         "others with the asyncio one); RSS is printed after each")
    ap.add_argument("--idle-rounds", type=int, default=0,
                    help="after the load rounds, this many rounds of --seconds with no client "
                         "(backups still run); RSS is printed after each: growth that goes on "
                         "there too comes from the jobs, not from requests")
    ap.add_argument("--dir", default=None, help="work directory (default: a new temporary one)")
    ap.add_argument("--client", choices=["python", "wrk"], default="python",
                    help="the load round's client: this script's asyncio clients (per endpoint "
                         "figures, but its own queueing is part of them) or wrk")
    a = ap.parse_args()
    bin_ = os.path.abspath(a.bin)
    work = a.dir or tempfile.mkdtemp(prefix="bulwark-api-load-")
    os.makedirs(work, exist_ok=True)
    vms = [f"vm{i:02}" for i in range(a.vms)]
    for vm in vms:
        with open(os.path.join(work, f"{vm}.img"), "wb") as f:
            for _ in range(a.disk_mib):
                f.write(os.urandom(1 << 20))
    cfg = os.path.join(work, "bulwark.toml")
    with open(cfg, "w") as f:
        f.write(f'vault = "vault"\nstate_dir = "state"\nconcurrency = 2\ngc_interval_hours = 0\n\n'
                f'[http]\nlisten = "127.0.0.1:{a.port}"\n\n')
        for vm in vms:
            f.write(f'[[vm]]\nname = "{vm}"\ndisks = [{{ name = "os", path = "{vm}.img" }}]\n'
                    f'policy = {POLICY}\nschedule_override_seconds = 10\n\n')
    token = subprocess.run([bin_, "token", "create", "--scope", "operator", "--name", "bench",
                            "--config", cfg], check=True, capture_output=True,
                           text=True).stdout.strip()
    log = open(os.path.join(work, "serve.log"), "w")
    daemon = subprocess.Popen([bin_, "serve", "--config", cfg], stdout=subprocess.DEVNULL,
                              stderr=log, env={**os.environ, "BULWARK_LOG": "warn"})
    stop_writer = False

    def rewrite_some():
        # 4 MiB of each disk rewritten at random offsets: the next backup has work.
        for vm in vms:
            with open(os.path.join(work, f"{vm}.img"), "r+b") as f:
                for _ in range(4):
                    f.seek(random.randrange(a.disk_mib) << 20)
                    f.write(os.urandom(1 << 20))

    try:
        for _ in range(600):
            try:
                http_json(a.port, token, "/healthz")
                break
            except Exception:
                time.sleep(0.1)
        t_start = time.time()
        # Warm-up round (allocator and caches reach their steady state).
        asyncio.run(load(a.port, token, vms, min(a.clients, 50), 5))
        rss_before = rss_kib(daemon.pid)

        async def with_writer():
            async def writer():
                while not stop_writer:
                    await asyncio.to_thread(rewrite_some)
                    await asyncio.sleep(3)
            w = asyncio.create_task(writer())
            if a.client == "wrk":
                r = await load_wrk(a.port, token, vms, a.clients, a.seconds, work)
            else:
                r = await load(a.port, token, vms, a.clients, a.seconds)
            w.cancel()
            return r

        load_avg_before = open("/proc/loadavg").read().split()[:3]
        stats, errors = asyncio.run(with_writer()), []
        if a.client != "wrk":
            stats, errors = stats[0], stats[1]
        load_avg_after = open("/proc/loadavg").read().split()[:3]
        rss_after = rss_kib(daemon.pid)
        mem = [("load round", rss_after, rss_kib(daemon.pid, "RssAnon"),
                rss_kib(daemon.pid, "Threads"), heap_arenas(daemon.pid))]
        stats2, errors2 = {}, []
        for r in range(2, a.rounds + 1):
            st, er = asyncio.run(load(a.port, token, vms, a.clients, a.seconds))
            if r == 2:
                stats2, errors2 = st, er
            else:
                errors2 += er
            mem.append((f"round {r}", rss_kib(daemon.pid), rss_kib(daemon.pid, "RssAnon"),
                        rss_kib(daemon.pid, "Threads"), heap_arenas(daemon.pid)))
        rss_after2 = mem[-1][1]
        for r in range(1, a.idle_rounds + 1):
            time.sleep(a.seconds)
            mem.append((f"idle round {r}", rss_kib(daemon.pid), rss_kib(daemon.pid, "RssAnon"),
                        rss_kib(daemon.pid, "Threads"), heap_arenas(daemon.pid)))
        # Let running jobs end, then stop the daemon (SIGTERM: running jobs finish).
        for _ in range(1200):
            j = http_json(a.port, token, "/api/v1/jobs?limit=1000")
            if not j["running"]:
                break
            time.sleep(0.5)
        jobs = [x for x in j["jobs"] if x["started"] >= time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(t_start))]
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
    states = {}
    for x in jobs:
        states[x["state"]] = states.get(x["state"], 0) + 1
    verify = subprocess.run([bin_, "verify", "--vault", os.path.join(work, "vault")],
                            capture_output=True, text=True)

    print(f"work dir {work}; {a.clients} clients x {a.seconds} s, {len(vms)} VMs x "
          f"{a.disk_mib} MiB, a backup of each every 10 s")
    print(f"load average before/after the run: {' '.join(load_avg_before)} / "
          f"{' '.join(load_avg_after)}")
    rounds = [("load round (backups running)", stats, errors)]
    if a.rounds >= 2:
        rounds.append(("second round", stats2, errors2))
    if a.client == "wrk":
        print(f"\nload round (backups running), wrk -t2 -c{a.clients} -d{a.seconds}s over all "
              f"read endpoints:")
        print(stats["raw"])
        errors = stats["errors"]
        rounds = rounds[1:]
    for name, st, err in rounds:
        total = sum(len(v) for v in st.values())
        print(f"\n{name}: {total} requests, {total / a.seconds:.0f}/s, {len(err)} errors"
              + (f" (first: {err[0]})" if err else ""))
        print(f"{'endpoint':<28} {'n':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        reads = []
        for e in ENDPOINTS:
            v = st.get(e, [])
            reads += v
            print(f"{e:<28} {len(v):>7} {pct(v, 50) * 1000:>8.1f} {pct(v, 99) * 1000:>8.1f} "
                  f"{(max(v) if v else float('nan')) * 1000:>8.1f}")
        print(f"{'all read endpoints':<28} {len(reads):>7} {pct(reads, 50) * 1000:>8.1f} "
              f"{pct(reads, 99) * 1000:>8.1f} {max(reads) * 1000:>8.1f}")
    print(f"\ndaemon RSS: {rss_before / 1024:.1f} MiB after warm-up, {rss_after / 1024:.1f} MiB "
          f"after the load round, {rss_after2 / 1024:.1f} MiB after the last round")
    for name, rss, anon, threads, arenas in mem:
        print(f"  after {name}: VmRSS {rss / 1024:.1f} MiB, RssAnon {anon / 1024:.1f} MiB, "
              f"{threads} threads, {arenas} malloc arenas besides the main one")
    print(f"jobs during the run: {states}")
    print(f"verify: exit {verify.returncode}: {verify.stdout.strip()[-300:]}"
          f"{verify.stderr.strip()[-300:]}")
    ok = verify.returncode == 0 and states.get("Failed", 0) == 0 and not errors and not errors2
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
