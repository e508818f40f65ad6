"""Starts real collector processes on 127.0.0.1 with ephemeral ports and temp databases."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
COLLECTOR_BIN = Path(os.environ.get("COLLECTOR_BIN", ROOT / "target" / "debug" / "collector"))
LISTENING = re.compile(r"otlp_grpc=(\S+) otlp_http=(\S+) http=(\S+)")


def wait_until(check, timeout=30.0, interval=0.05, what="condition"):
    """Polls `check` until it returns a truthy value; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last error: {last_error!r}")


class Collector:
    def __init__(self, db: Path, extra_args=(), max_fds=None, log_path=None):
        self.db = db
        self.extra_args = list(extra_args)
        self.max_fds = max_fds
        # Where stderr goes: a pipe read here by default, or this file (as `./run` lays it out).
        self.log_path = log_path
        self.proc = None
        self.log = []

    def start(self):
        args = [
            str(COLLECTOR_BIN),
            "--otlp-grpc-addr", "127.0.0.1:0",
            "--otlp-http-addr", "127.0.0.1:0",
            "--http-addr", "127.0.0.1:0",
            "--db", str(self.db),
            *self.extra_args,
        ]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info,h2=warn,hyper=warn")}
        limit = None
        if self.max_fds:
            import resource
            limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_fds, self.max_fds))  # noqa: E731 - `ulimit -n`
        stderr = open(self.log_path, "a") if self.log_path else subprocess.PIPE  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(args, stderr=stderr, stdout=subprocess.DEVNULL, text=True, env=env, preexec_fn=limit)
        self.log = []
        addrs = {}
        found = threading.Event()

        def lines():
            if not self.log_path:
                yield from self.proc.stderr
                return
            with open(self.log_path, errors="replace") as f:
                while True:
                    line = f.readline()
                    if line:
                        yield line
                    elif self.proc.poll() is not None:
                        return
                    else:
                        time.sleep(0.02)

        def reader():
            for line in lines():
                self.log.append(line)
                if os.environ.get("TEST_LOG"):
                    print(line, end="")
                m = LISTENING.search(line)
                if m and not found.is_set():
                    addrs.update(grpc=m.group(1), otlp_http=m.group(2), http=m.group(3))
                    found.set()

        threading.Thread(target=reader, daemon=True).start()
        deadline = time.monotonic() + 60
        while not found.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("collector did not start:\n" + "".join(self.log))
        self.grpc_endpoint = addrs["grpc"]
        self.otlp_http = f"http://{addrs['otlp_http']}"
        self.http = f"http://{addrs['http']}"
        wait_until(lambda: requests.get(f"{self.http}/healthz", timeout=2).status_code == 200, what="healthz")
        return self

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def get(self, path, **params):
        return requests.get(f"{self.http}{path}", params=params, timeout=10)

    def api(self, path, **params):
        r = self.get(path, **params)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        return r.json()


@pytest.fixture
def collector(tmp_path):
    c = Collector(tmp_path / "data" / "collector.db").start()
    yield c
    c.stop(signal.SIGKILL)


@pytest.fixture
def make_collector(tmp_path):
    started = []

    def make(db=None, extra_args=()):
        c = Collector(db or tmp_path / "data" / "collector.db", extra_args).start()
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop(signal.SIGKILL)
