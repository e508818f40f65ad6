"""The whole demo's footprint: starts `./run` (collector, NATS, registry, every service, gateway,
load generator at the default rate) in a temp data folder, lets it warm up, then samples every
process's RSS and CPU time from /proc and prints a table (per process: mean and peak RSS, CPU as
a share of one core) and the totals. A measurement run by hand, not a test:

    .venv/bin/python tests/footprint.py [--warmup 60] [--seconds 120] [--load 5]

It needs the release build `./run` makes (it builds it if missing) and the demo's ports free.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def demo_processes(data: str):
    """pid → name of the demo's processes: the release binaries and the nats-server of `data`."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if exe.startswith(str(RELEASE) + "/"):
            found[int(pid)] = Path(exe).name
        elif exe.endswith("nats-server") and any(data.encode() in c for c in cmd):
            found[int(pid)] = "nats-server"
    return found


def sample(pid):
    """(RSS bytes, CPU seconds) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * PAGE
    return rss, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=float, default=60)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--load", default="5")
    args = ap.parse_args()

    data = tempfile.mkdtemp(prefix="switchyard-footprint-")
    log = open(Path(data) / "run.log", "w+")
    run = subprocess.Popen([str(ROOT / "run"), "--data", data, "--load", args.load], stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 3600
        while "Switchyard is running" not in Path(log.name).read_text():
            if run.poll() is not None or time.monotonic() > deadline:
                sys.exit("./run did not come up:\n" + Path(log.name).read_text()[-3000:])
            time.sleep(1)
        print(f"demo up; warming up for {args.warmup:.0f} s", file=sys.stderr)
        time.sleep(args.warmup)
        procs = demo_processes(data)
        first = {pid: sample(pid) for pid in procs}
        rss = {pid: [] for pid in procs}
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            for pid in procs:
                try:
                    rss[pid].append(sample(pid)[0])
                except OSError:
                    pass
            time.sleep(2)
        elapsed = time.monotonic() - started
        last = {pid: sample(pid) for pid in procs}
    finally:
        os.killpg(run.pid, signal.SIGINT)
        run.wait(timeout=120)

    rows = []
    for pid, name in sorted(procs.items(), key=lambda p: p[1]):
        cpu = (last[pid][1] - first[pid][1]) / elapsed * 100
        mean = sum(rss[pid]) / len(rss[pid]) / 2**20
        rows.append((name, mean, max(rss[pid]) / 2**20, cpu))
    print(f"{'process':<16} {'RSS mean MiB':>12} {'RSS peak MiB':>12} {'CPU % of a core':>16}")
    for name, mean, peak, cpu in rows:
        print(f"{name:<16} {mean:>12.1f} {peak:>12.1f} {cpu:>16.1f}")
    print(f"{'total':<16} {sum(r[1] for r in rows):>12.1f} {sum(r[2] for r in rows):>12.1f} {sum(r[3] for r in rows):>16.1f}")
    print(f"({len(rows)} processes, load {args.load} actions/s, {elapsed:.0f} s sampled after {args.warmup:.0f} s warm-up)")


if __name__ == "__main__":
    main()
