#!/usr/bin/env python3
"""Helpers of benches/compare.sh.

  compare.py scatter IMAGE FRACTION RUN_BYTES SEED   write FRACTION of IMAGE in RUN_BYTES extents
  compare.py qmp-scatter QMP DEVICE IMAGE_BYTES FRACTION RUN_BYTES SEED TMPDIR
                                                     the same writes, into a running VM's disk
                                                     DEVICE through its QMP socket (HMP qemu-io)
  compare.py qcow2-scatter IMAGE IMAGE_BYTES FRACTION RUN_BYTES SEED TMPDIR
                                                     the same writes, into an offline qcow2
                                                     image through one qemu-io process
  compare.py qmp QMP COMMAND [JSON-ARGS]             one QMP command, its reply on stdout
  compare.py report OUT IMAGE_BYTES                  OUT/summary.md (+ OUT/compare.png)
"""
import csv
import json
import os
import random
import socket
import statistics
import subprocess
import sys

BULWARKS = ["bulwark", "bulwark-notrack", "bulwark-256k"]


def scatter(image, fraction, run_bytes, seed):
    size = os.path.getsize(image)
    count = 0
    with open(image, "r+b") as f:
        for at, data in extents(size, fraction, run_bytes, seed):
            f.seek(at)
            f.write(data)
            count += 1
    print(f"scatter: {count} extents of {run_bytes} bytes ({count * run_bytes} bytes)")


def extents(size, fraction, run_bytes, seed):
    """(offset, bytes) of the scattered writes: the same sequence for the file and QMP paths."""
    rng = random.Random(int(seed))
    count = max(1, round(size * float(fraction) / run_bytes))
    pages = (size - run_bytes) // 4096
    for _ in range(count):
        at = rng.randrange(pages) * 4096
        yield at, rng.randbytes(run_bytes)


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.file.readline()  # greeting
        self.command("qmp_capabilities")

    def command(self, name, **args):
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            # an event: skip


def qmp_scatter(qmp_path, device, size, fraction, run_bytes, seed, tmpdir):
    qmp = Qmp(qmp_path)
    tmp = os.path.join(tmpdir, "qmp-scatter.bin")
    count = total = 0
    for at, data in extents(int(size), fraction, int(run_bytes), seed):
        with open(tmp, "wb") as f:
            f.write(data)
        out = qmp.command("human-monitor-command",
                          **{"command-line": f'qemu-io {device} "write -q -s {tmp} {at} {len(data)}"'})
        if out.strip():
            raise RuntimeError(f"qemu-io write at {at}: {out.strip()}")
        count += 1
        total += len(data)
    out = qmp.command("human-monitor-command", **{"command-line": f'qemu-io {device} "flush"'})
    if out.strip():
        raise RuntimeError(f"qemu-io flush: {out.strip()}")
    os.unlink(tmp)
    print(f"qmp-scatter: {count} extents of {run_bytes} bytes ({total} bytes) through QEMU")


def qcow2_scatter(image, size, fraction, run_bytes, seed, tmpdir):
    """The same writes into a qcow2 image no VM runs, by a QEMU program (qemu-io), so that the
    image's persistent dirty bitmap records them as it would a VM's writes."""
    files, args, total = [], [], 0
    try:
        for i, (at, data) in enumerate(extents(int(size), fraction, int(run_bytes), seed)):
            path = os.path.join(tmpdir, f"qcow2-scatter-{i}.bin")
            with open(path, "wb") as f:
                f.write(data)
            files.append(path)
            args += ["-c", f"write -q -s {path} {at} {len(data)}"]
            total += len(data)
        subprocess.run(["qemu-io", "-f", "qcow2", *args, "-c", "flush", image], check=True)
    finally:
        for path in files:
            os.unlink(path)
    print(f"qcow2-scatter: {len(files)} extents of {run_bytes} bytes ({total} bytes) through qemu-io")


def report(out, image_bytes):
    image_bytes = int(image_bytes)
    gib = image_bytes / (1 << 30)
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    repos = list(csv.DictReader(open(os.path.join(out, "repos.csv"))))
    by = {}
    for r in rows:
        by.setdefault((r["tool"], r["op"]), []).append(r)
    med = {k: statistics.median(float(r["wall_s"]) for r in v) for k, v in by.items()}
    repo = {}
    for r in repos:
        repo.setdefault(r["tool"], []).append(int(r["repo_bytes_apparent"]))
    lines = []
    lines.append(f"Image: {gib:.1f} GiB. Wall: median of the runs (min-max). GiB/s: image size / median wall.")
    lines.append("")
    lines.append("| tool | operation | runs | wall s (median) | min-max | GiB/s | max RSS MiB | load1 at start |")
    lines.append("|---|---|---|---|---|---|---|---|")
    order = ["cat", "zstd"] + BULWARKS + ["restic", "borg"]
    for (tool, op), v in sorted(by.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 9, kv[0][1])):
        walls = [float(r["wall_s"]) for r in v]
        rss = max(int(r["max_rss_kb"]) for r in v) / 1024
        load = statistics.median(float(r["load1"]) for r in v)
        size = 16 if op == "full-16G" else gib
        m = med[(tool, op)]
        lines.append(f"| {tool} | {op} | {len(v)} | {m:.2f} | {min(walls):.2f}-{max(walls):.2f} | "
                     f"{size / m if m > 0 else float('inf'):.2f} | {rss:.0f} | {load:.2f} |")
    lines.append("")
    lines.append("| tool | repository bytes after full + incremental (du -sb, median) |")
    lines.append("|---|---|")
    for tool, v in repo.items():
        b = statistics.median(v)
        lines.append(f"| {tool} | {b / (1 << 20):.0f} MiB ({b / image_bytes:.1%} of the image) |")
    lines.append("")
    lines.append("Ratios (other tool's median wall / Bulwark's; > 1 means Bulwark is faster):")
    lines.append("")
    lines.append("| Bulwark | operation | vs restic | vs borg | vs cat (warm) | vs cat (fresh clone) | vs zstd -1 -T0 |")
    lines.append("|---|---|---|---|---|---|---|")
    for tool in BULWARKS:
        for op in ["full", "incremental", "restore"]:
            if (tool, op) not in med:
                continue
            b = med[(tool, op)]
            def ratio(key):
                return f"{med[key] / b:.1f}x" if key in med and b > 0 else "-"
            lines.append(f"| {tool} | {op} | {ratio(('restic', op))} | {ratio(('borg', op))} | "
                         f"{ratio(('cat', 'warm'))} | {ratio(('cat', 'clone'))} | {ratio(('zstd', 'full'))} |")
    cases = [("xfs: image on reflink XFS", ""), ("ext4: raw image on ext4 (offline)", "ext4-"),
             ("ext4q: qcow2 image on ext4 (offline, persistent dirty bitmap)", "ext4q-"),
             ("vm: running VM, image on ext4 (--qmp)", "vm-")]
    if any((p + "bulwark", "full") in med for _, p in cases[1:]):
        lines.append("")
        lines.append("Cases (median wall; ratios are the other tool's median / Bulwark's, > 1 means "
                     "Bulwark is faster; the last column is Bulwark's full in this case / its full on XFS):")
        lines.append("")
        lines.append("| case | Bulwark full | vs restic | vs borg | Bulwark incremental | vs restic | vs borg "
                     "| Bulwark restore | vs restic | vs borg | full / full on XFS |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for (label, p), variant in [(c, v) for c in cases for v in ["bulwark", "bulwark-256k"]]:
            if (p + variant, "full") not in med:
                continue
            if variant != "bulwark":
                label += ", 256 KiB blocks"
            cells = []
            for op in ["full", "incremental", "restore"]:
                b = med.get((p + variant, op))
                cells.append(f"{b:.2f} s" if b is not None else "-")
                for other in ["restic", "borg"]:
                    o = med.get((p + other, op))
                    cells.append(f"{o / b:.1f}x" if b and o is not None else "-")
            xfs = med.get(("bulwark", "full"))
            full = med.get((p + variant, "full"))
            cells.append(f"{full / xfs:.2f}" if xfs and full else "-")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("What each Bulwark incremental read (run 1, from its --json report):")
    lines.append("")
    for tool in BULWARKS + [c + b for c in ["ext4-", "ext4q-", "vm-"] for b in ["bulwark", "bulwark-256k"]]:
        log = os.path.join(out, f"log-{tool}-incremental-1.txt")
        if not os.path.exists(log):
            continue
        try:
            text = open(log).read()
            rep = json.loads(text[text.index("{"):text.rindex("}") + 1])
            d = rep["disks"][0]
            lines.append(f"* {tool}: read {d['bytes_read'] / (1 << 20):.0f} MiB; {d['changed_blocks']} changed blocks "
                         f"of {d['blocks']}, {d.get('blocks_not_read', 0)} unchanged blocks not read (change tracking), "
                         f"{d['hole_blocks']} zero blocks not read; uploaded {d['bytes_uploaded'] / (1 << 20):.0f} MiB"
                         + (f"; full read because: {d['change_tracking']}" if d.get("change_tracking") else ""))
        except (ValueError, KeyError) as e:
            lines.append(f"* {tool}: report unreadable ({e})")
    text = "\n".join(lines) + "\n"
    machine = os.path.join(out, "machine.txt")
    if os.path.exists(machine):
        text = "".join("    " + l for l in open(machine)) + "\n" + text
    open(os.path.join(out, "summary.md"), "w").write(text)
    print(text)
    plot(out, med, gib)


def plot(out, med, gib):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)")
        return
    ops = ["full", "incremental", "restore"]
    tools = [t for t in BULWARKS + ["restic", "borg"] if any((t, o) in med for o in ops)]
    fig, ax = plt.subplots(figsize=(8.5, 3.8), dpi=90)
    width = 0.8 / max(1, len(tools))
    colors = {"bulwark": "#2b6cb0", "bulwark-notrack": "#63b3ed", "bulwark-256k": "#1a365d",
              "restic": "#dd6b20", "borg": "#38a169"}
    for i, t in enumerate(tools):
        xs = [j + i * width for j in range(len(ops))]
        ys = [med.get((t, o), 0) for o in ops]
        bars = ax.bar(xs, ys, width, label=t, color=colors.get(t))
        for x, y in zip(xs, ys):
            if y:
                ax.text(x, y, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
    for key, style, label in [(("cat", "warm"), "--", "cat (warm)"), (("cat", "clone"), "-.", "cat (fresh reflink clone)"),
                              (("zstd", "full"), ":", "zstd -1 -T0")]:
        if key in med:
            ax.axhline(med[key], linestyle=style, color="gray", linewidth=1)
            ax.text(len(ops) - 0.55, med[key], label, fontsize=7, color="dimgray", va="bottom", ha="right", zorder=5,
                    bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.8))
    ax.set_xticks([j + width * (len(tools) - 1) / 2 for j in range(len(ops))])
    ax.set_xticklabels(ops)
    ax.set_ylabel("wall seconds (median, lower is better)")
    ax.set_title(f"{gib:.0f} GiB ext4 guest image, warm page cache")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "scatter" and len(sys.argv) == 6:
        scatter(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif len(sys.argv) == 9 and sys.argv[1] == "qmp-scatter":
        qmp_scatter(*sys.argv[2:9])
    elif len(sys.argv) == 8 and sys.argv[1] == "qcow2-scatter":
        qcow2_scatter(*sys.argv[2:8])
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "qmp":
        args = json.loads(sys.argv[4]) if len(sys.argv) == 5 else {}
        print(json.dumps(Qmp(sys.argv[2]).command(sys.argv[3], **args)))
    elif len(sys.argv) == 4 and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
