"""Starts the demo platform for tests: a collector, the registry, users, catalog instances and the
gateway — with `orders=True` also NATS (JetStream), inventory, payments, orders and notifications —
each a real process on 127.0.0.1 with an ephemeral port and its own temp database."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import requests

from conftest import Collector, wait_until

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("SWITCHYARD_BIN", ROOT / "target" / "debug"))
LISTENING = re.compile(r'listening .*?addr="?([0-9.]+:[0-9]+)')
INSTANCE = re.compile(r'instance="?([A-Za-z0-9._:-]+)')


class Proc:
    """One process; `addr` is the bound address it logged (the first line `ready` matches)."""

    def __init__(self, name, args, env, ready=LISTENING, max_fds=None):
        self.name, self.args, self.env, self.ready, self.max_fds = name, args, env, ready, max_fds
        self.log, self.addr, self.instance_id, self.proc = [], None, None, None

    def start(self, timeout=60):
        self.log = []
        limit = None
        if self.max_fds:
            import resource
            limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_fds, self.max_fds))  # noqa: E731 - `ulimit -n`
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=self.env, preexec_fn=limit)
        found = threading.Event()

        def reader():
            for line in self.proc.stderr:
                self.log.append(line)
                if os.environ.get("TEST_LOG"):
                    print(f"[{self.name}] {line}", end="")
                m = self.ready.search(line)
                if m and not found.is_set():
                    self.addr = m.group(1)
                    i = INSTANCE.search(line)
                    self.instance_id = i.group(1) if i else None
                    found.set()

        threading.Thread(target=reader, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start:\n" + "".join(self.log))
        return self

    @property
    def url(self):
        return f"http://{self.addr}"

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=timeout)
        return self.proc.returncode if self.proc else None


NATS_LISTENING = re.compile(r"Listening for client connections on ([0-9.]+:[0-9]+)")


class Nats(Proc):
    """A real nats-server with JetStream, its store in a temp folder; restarts on the same port."""

    def __init__(self, store: Path):
        super().__init__("nats", [], os.environ, NATS_LISTENING)
        self.store = store

    def start(self, timeout=30):
        port = self.addr.rsplit(":", 1)[1] if self.addr else "-1"
        self.args = ["nats-server", "-a", "127.0.0.1", "-p", port, "-js", "-sd", str(self.store)]
        return super().start(timeout)

    @property
    def url(self):
        return f"nats://{self.addr}"


class Shop:
    """The platform. Fast health checks and heartbeats so failures are noticed within a second."""

    def __init__(self, tmp: Path, collector: Collector, catalogs=3, users_args=(), gateway_args=(), orders=False):
        self.tmp, self.collector = tmp, collector
        self.catalogs_n, self.users_args, self.gateway_args = catalogs, list(users_args), list(gateway_args)
        self.with_orders = orders
        self.nats = None
        self.procs = []
        self.env = {
            **os.environ,
            "RUST_LOG": os.environ.get("RUST_LOG", "info,h2=warn,hyper=warn"),
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector.grpc_endpoint}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
            "HEARTBEAT_INTERVAL": "500ms",
        }

    def spawn(self, name, *args):
        p = Proc(name, [str(BIN / name.split("-")[0]), *args], self.env).start()
        self.procs.append(p)
        return p

    def start_registry(self, addr="127.0.0.1:0"):
        self.registry = self.spawn(
            "registry", "--addr", addr, "--db", str(self.tmp / "registry.db"),
            "--health-check-interval", "300ms", "--health-check-timeout", "500ms", "--health-check-failures", "1",
            "--sweep-interval", "200ms", "--renewal-window", "10s",
        )
        self.env["REGISTRY_URL"] = self.registry.url
        return self.registry

    def service(self, name, *extra):
        return self.spawn(name, "--db", str(self.tmp / f"{name.split('-')[0]}.db"), *extra)

    def start(self, registry_addr="127.0.0.1:0"):
        if self.with_orders:
            self.nats = Nats(self.tmp / "nats").start()
            self.env["NATS_URL"] = self.nats.url
        self.start_registry(registry_addr)
        self.users = self.service("users", *self.users_args)
        self.catalogs = [self.service(f"catalog-{i}") for i in range(self.catalogs_n)]
        counts = dict(users=1, catalog=self.catalogs_n)
        if self.with_orders:
            self.inventory = self.service("inventory", "--restock-interval", "0s")
            self.payments = self.service("payments")
            self.orders = self.start_orders()
            self.notifications = self.service("notifications")
            counts.update(inventory=1, payments=1, orders=1, notifications=1)
        self.gateway = self.start_gateway(*self.gateway_args)
        self.wait_up(gateway=1, **counts)
        self.wait_routable(self.gateway, **counts)
        return self

    def start_orders(self, name="orders", *extra):
        """An orders instance that gives up a dead instance's sagas after 2 s."""
        return self.service(name, "--saga-lease", "2s", "--recovery-interval", "200ms", "--call-timeout", "2s", *extra)

    def wait_routable(self, gateway, **counts):
        """Until the gateway's own view (from its registry watch) has these instances UP."""
        def ready():
            view = requests.get(f"{gateway.url}/admin/upstreams", timeout=10).json()["services"]
            return all(sum(1 for i in view.get(s, {}).get("instances", []) if i["status"] == "UP") >= n for s, n in counts.items())
        wait_until(ready, timeout=30, what=f"the gateway routing to {counts}")

    def start_gateway(self, *args):
        defaults = {"--addr": "127.0.0.1:0", "--rate-limit": "1000", "--rate-burst": "1000"}
        extra = [x for k, v in defaults.items() if k not in args for x in (k, v)]
        return self.spawn("gateway", *extra, *args)

    def instances(self, **params):
        r = requests.get(f"{self.registry.url}/v1/instances", params=params, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["instances"]

    def wait_up(self, **counts):
        def ready():
            up = self.instances(status="UP")
            return all(sum(1 for i in up if i["service"] == s) >= n for s, n in counts.items())
        wait_until(ready, timeout=30, what=f"instances UP: {counts}")

    def api(self, method, path, gateway=None, **kw):
        kw.setdefault("timeout", 10)
        return requests.request(method, f"{(gateway or self.gateway).url}{path}", **kw)

    def stop(self):
        for p in reversed(self.procs):
            p.stop(signal.SIGKILL)
        if self.nats:
            self.nats.stop(signal.SIGKILL)
