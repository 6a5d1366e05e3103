"""Fixtures for the interop tests: Python stubs generated from proto/, and meshd processes.

Every meshd started here gets a fresh data dir and ephemeral ports on loopback; its listener
addresses are read from its log lines (`listening listener=<name> addr=<ip:port>`) with a
deadline, and the process is always ended at teardown, whatever the test's outcome.

A skipped test is a failed test in this suite: the hooks at the bottom turn every skip
(in a test or at collection) into a failure that prints the skip's reason.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.resources
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"
GEN_DIR = Path(__file__).resolve().parent / "gen"
MESHD_BIN = Path(os.environ.get("MESHD_BIN") or (REPO_ROOT / "target" / "debug" / "meshd"))

#: How long meshd may take to print all its listener lines (a cold debug build generating an
#: RSA root on a busy 2-core machine is the slow case).
STARTUP_TIMEOUT_S = float(os.environ.get("MESHD_STARTUP_TIMEOUT", "60"))
#: How long one gRPC call may take.
RPC_TIMEOUT_S = 30.0

LISTENERS = ("grpc-tls", "grpc-plaintext", "monitoring", "ready")
_LISTEN_RE = re.compile(r"\blistening\b.*?\blistener=(?P<name>[\w-]+)\s+addr=(?P<addr>\S+)")

#: The serving certificate's istiod names (namespace istio-system) and the name tests verify.
SERVER_NAME = "istiod.istio-system.svc"
ISTIOD_DNS_SANS = (
    "istiod.istio-system.svc",
    "istiod-remote.istio-system.svc",
    "istio-pilot.istio-system.svc",
)

#: meshd reads these from the environment (see src/config.rs); the children never inherit them,
#: so a developer's shell cannot change what the tests see.
_MESHD_ENV = (
    "MESHD_DATA_DIR",
    "MESHD_GRPC_ADDR",
    "MESHD_PLAINTEXT_ADDR",
    "MESHD_MONITORING_ADDR",
    "MESHD_READY_ADDR",
    "TRUST_DOMAIN",
    "CLUSTER_ID",
    "POD_NAMESPACE",
    "ROOT_CA_DIR",
    "MESHD_CA_KEY_TYPE",
    "ISTIOD_CUSTOM_HOST",
    "MESHD_SERVING_CERT_TTL",
    "DEFAULT_WORKLOAD_CERT_TTL",
    "MAX_WORKLOAD_CERT_TTL",
    "TOKEN_AUDIENCES",
    "JWT_RULE",
    "MESHD_DISABLE_LOCAL_ISSUER",
    "MESHD_TOKEN_REVIEW_CACHE_TTL",
    "MESHD_SHUTDOWN_DURATION",
    "MESHD_LOG_LEVEL",
    "MESHD_LOG_FORMAT",
    "ISTIO_META_CLUSTER_ID",
    "RUST_LOG",
)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _MESHD_ENV}
    return env


def spawn(argv) -> tuple[subprocess.Popen, "_StderrCollector"]:
    """Starts a child (meshd, a fake API server, Envoy) with a clean environment, its stderr
    drained by a collector, and registers it so it is ended at exit whatever happens."""
    proc = subprocess.Popen(
        [str(a) for a in argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=child_env(),
    )
    _ALL_PROCESSES.append(proc)
    return proc, _StderrCollector(proc.stderr)


# --------------------------------------------------------------------------------------------
# Generated stubs
# --------------------------------------------------------------------------------------------


def _well_known_includes() -> Path:
    """grpc_tools' bundled include dir (google/protobuf/*.proto)."""
    inc = Path(str(importlib.resources.files("grpc_tools") / "_proto"))
    if not (inc / "google" / "protobuf" / "struct.proto").is_file():
        raise RuntimeError(f"grpc_tools ships no google/protobuf/struct.proto under {inc}")
    return inc


def generate_stubs() -> Path:
    """Regenerates tests/interop/gen/ from proto/ with grpc_tools.protoc and returns it.

    struct.proto is resolved from grpc_tools' bundled includes; its Python module is not
    generated (the protobuf runtime ships google.protobuf.struct_pb2, and a second copy would
    clash in the default descriptor pool).
    """
    protos = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_DIR}")
    if GEN_DIR.exists():
        shutil.rmtree(GEN_DIR)
    GEN_DIR.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{_well_known_includes()}",
        f"--python_out={GEN_DIR}",
        f"--pyi_out={GEN_DIR}",
        f"--grpc_python_out={GEN_DIR}",
        *protos,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=PROTO_DIR)
    if r.returncode != 0:
        raise RuntimeError(f"protoc failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return GEN_DIR


@dataclass(frozen=True)
class CaStubs:
    pb2: object  # istio.v1.auth.ca_pb2
    grpc: object  # istio.v1.auth.ca_pb2_grpc


@pytest.fixture(scope="session")
def ca_stubs() -> CaStubs:
    gen = generate_stubs()
    if str(gen) not in sys.path:
        sys.path.insert(0, str(gen))
    importlib.invalidate_caches()
    pb2 = importlib.import_module("istio.v1.auth.ca_pb2")
    pb2_grpc = importlib.import_module("istio.v1.auth.ca_pb2_grpc")
    md = pb2.IstioCertificateRequest.DESCRIPTOR.fields_by_name["metadata"]
    assert md.message_type.full_name == "google.protobuf.Struct"
    return CaStubs(pb2=pb2, grpc=pb2_grpc)


# --------------------------------------------------------------------------------------------
# meshd processes
# --------------------------------------------------------------------------------------------


class _StderrCollector:
    """Drains a child's stderr on a thread (so the pipe never fills) and lets callers wait for
    lines with a deadline."""

    def __init__(self, stream):
        self._stream = stream
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="meshd-stderr", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for line in self._stream:
                with self._cond:
                    self._lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def text(self) -> str:
        return "\n".join(self.lines())

    def wait(self, predicate, deadline: float) -> bool:
        """Waits until predicate(lines) is true, the stream ends or the deadline passes."""
        with self._cond:
            while True:
                if predicate(self._lines):
                    return True
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return predicate(self._lines)
                self._cond.wait(timeout=min(remaining, 0.5))

    def join(self, timeout: float):
        self._thread.join(timeout)


def parse_listeners(lines) -> dict[str, tuple[str, int]]:
    found = {}
    for line in lines:
        m = _LISTEN_RE.search(line)
        if m:
            host, _, port = m.group("addr").rpartition(":")
            found[m.group("name")] = (host.strip("[]"), int(port))
    return found


_ALL_PROCESSES: list[subprocess.Popen] = []


def _end_process(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@atexit.register
def _end_leftovers():
    for p in _ALL_PROCESSES:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def _no_proxy_opener():
    # grpc and urllib both honour *_proxy variables; nothing here may go through a proxy.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format → {"name" or "name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)(?:\s+\d+)?$", line)
        assert m, f"unparseable metrics line: {line!r}"
        out[m.group(1)] = float(m.group(2))
    return out


@dataclass
class Meshd:
    proc: subprocess.Popen
    data_dir: Path
    args: list[str]
    stderr: _StderrCollector
    addrs: dict[str, tuple[str, int]] = field(default_factory=dict)
    _channels: list[grpc.Channel] = field(default_factory=list)

    # -- addresses ---------------------------------------------------------------------------
    def target(self, listener: str) -> str:
        host, port = self.addrs[listener]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def tls_target(self) -> str:
        return self.target("grpc-tls")

    @property
    def plaintext_target(self) -> str:
        return self.target("grpc-plaintext")

    @property
    def root_cert_path(self) -> Path:
        return self.data_dir / "root-cert.pem"

    @property
    def root_pem(self) -> bytes:
        return self.root_cert_path.read_bytes()

    # -- clients -----------------------------------------------------------------------------
    @staticmethod
    def _options(extra=()):
        return [
            ("grpc.enable_http_proxy", 0),
            ("grpc.use_local_subchannel_pool", 1),
            *extra,
        ]

    def tls_channel(self, server_name: str | None = SERVER_NAME, target: str | None = None,
                    root_pem: bytes | None = None) -> grpc.Channel:
        """A TLS channel trusting the data dir's root-cert.pem. server_name=None verifies the
        certificate against the target's own host (an IP SAN for an IP target)."""
        creds = grpc.ssl_channel_credentials(root_certificates=root_pem or self.root_pem)
        extra = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        ch = grpc.secure_channel(target or self.tls_target, creds, options=self._options(extra))
        self._channels.append(ch)
        return ch

    def plaintext_channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.plaintext_target, options=self._options())
        self._channels.append(ch)
        return ch

    def token(self, namespace: str, service_account: str, audience: str | None = None,
              ttl: str | None = None, data_dir: Path | None = None) -> str:
        """A JWT minted by `meshd token` from this server's (or another) data dir."""
        cmd = [str(MESHD_BIN), "token", "--data-dir", str(data_dir or self.data_dir),
               "--namespace", namespace, "--service-account", service_account]
        if audience is not None:
            cmd += ["--audience", audience]
        if ttl is not None:
            cmd += ["--ttl", ttl]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=child_env())
        assert r.returncode == 0, f"meshd token failed ({r.returncode}): {r.stderr}"
        tok = r.stdout.strip()
        assert tok.count(".") == 2, f"meshd token printed no JWT: {r.stdout!r}"
        return tok

    def metrics_text(self) -> str:
        url = f"http://{self.target('monitoring')}/metrics"
        with _no_proxy_opener().open(url, timeout=10) as resp:
            assert resp.status == 200, f"GET {url}: {resp.status}"
            return resp.read().decode()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.metrics_text())

    def http_get(self, listener: str, path: str) -> tuple[int, str]:
        url = f"http://{self.target(listener)}{path}"
        try:
            with _no_proxy_opener().open(url, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self):
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        _end_process(self.proc)
        if self.proc.stderr:
            self.stderr.join(10)
            self.proc.stderr.close()

    def describe(self) -> str:
        return f"meshd {' '.join(self.args)}\n--- stderr ---\n{self.stderr.text()}"


def start_meshd(data_dir: Path, *extra_args: str, grpc_host: str = "127.0.0.1",
                plaintext_host: str = "127.0.0.1", webhook_host: str = "127.0.0.1") -> Meshd:
    """Starts `meshd serve` on ephemeral ports (loopback unless grpc_host / plaintext_host say
    otherwise: pods of the netns harness need netns.MESHD_HOST_FOR_PODS) and waits for its four
    listener lines."""
    if not MESHD_BIN.is_file() or not os.access(MESHD_BIN, os.X_OK):
        raise RuntimeError(f"meshd binary {MESHD_BIN} is missing; run `cargo build` or set MESHD_BIN")
    args = [
        "serve",
        "--data-dir", str(data_dir),
        "--grpc-addr", f"{grpc_host}:0",
        "--plaintext-addr", f"{plaintext_host}:0",
        "--monitoring-addr", "127.0.0.1:0",
        "--ready-addr", "127.0.0.1:0",
        "--webhook-addr", f"{webhook_host}:0",
        "--log-format", "text",
        "--log-level", "info",
        "--shutdown-duration", "2s",
        *extra_args,
    ]
    proc, stderr = spawn([MESHD_BIN, *args])
    m = Meshd(proc=proc, data_dir=data_dir, args=args, stderr=stderr)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        ok = m.stderr.wait(lambda lines: set(LISTENERS) <= set(parse_listeners(lines)), deadline)
        if not ok:
            state = "exited with %s" % proc.poll() if proc.poll() is not None else "still running"
            raise RuntimeError(
                f"meshd did not report all listeners {LISTENERS} within {STARTUP_TIMEOUT_S}s "
                f"({state})\n{m.describe()}"
            )
        m.addrs = parse_listeners(m.stderr.lines())
        if not m.root_cert_path.is_file():
            raise RuntimeError(f"meshd is listening but wrote no {m.root_cert_path}\n{m.describe()}")
        return m
    except BaseException:
        m.stop()
        raise


class MeshdLauncher:
    """Starts meshd processes in fresh data dirs and ends every one of them at close()."""

    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._started: list[Meshd] = []

    def start(self, *extra_args: str, grpc_host: str = "127.0.0.1", plaintext_host: str = "127.0.0.1",
              webhook_host: str = "127.0.0.1") -> Meshd:
        data_dir = self._tmp.mktemp("meshd-data")
        m = start_meshd(data_dir, *extra_args, grpc_host=grpc_host, plaintext_host=plaintext_host,
                        webhook_host=webhook_host)
        self._started.append(m)
        return m

    def close(self):
        errors = []
        for m in reversed(self._started):
            try:
                m.stop()
            except Exception as e:  # keep ending the others
                errors.append(e)
        self._started.clear()
        if errors:
            raise errors[0]


@pytest.fixture
def meshd_factory(tmp_path_factory):
    """Start any number of meshd processes; all are ended when the test finishes."""
    launcher = MeshdLauncher(tmp_path_factory)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture
def meshd(tmp_path_factory):
    """A fresh meshd (ECDSA P-256 root) for one test: its counters start at zero."""
    launcher = MeshdLauncher(tmp_path_factory)
    try:
        yield launcher.start("--ca-key-type", "ecdsa-p256")
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def shared_meshd(tmp_path_factory):
    """One meshd (ECDSA P-256 root) shared by a module's tests."""
    launcher = MeshdLauncher(tmp_path_factory)
    try:
        yield launcher.start("--ca-key-type", "ecdsa-p256")
    finally:
        launcher.close()


@pytest.fixture(scope="module", params=["ecdsa-p256", "rsa-2048"], ids=lambda p: f"root-{p}")
def meshd_by_root(request, tmp_path_factory):
    """One meshd per self-signed root key type, shared by a module's tests."""
    launcher = MeshdLauncher(tmp_path_factory)
    try:
        yield launcher.start("--ca-key-type", request.param)
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def meshd_on_127_0_0_2(tmp_path_factory):
    """meshd whose TLS port is bound on 127.0.0.2, with 127.0.0.2 as an IP SAN of its serving
    certificate (--server-san), as a LoadBalancer IP is made valid."""
    launcher = MeshdLauncher(tmp_path_factory)
    try:
        yield launcher.start("--ca-key-type", "ecdsa-p256", "--server-san", "127.0.0.2",
                             grpc_host="127.0.0.2")
    finally:
        launcher.close()


@pytest.fixture
def netlab():
    """Networks (bridges) and pods (network namespaces) for one test, with istio-init's capture
    and sidecars on demand (tests/interop/netns.py, sidecar.py). Everything it made — processes,
    namespaces, bridges — is removed at teardown. Fails (never skips) without root or the tools."""
    from netns import NetLab  # imports conftest: not at module level

    lab = NetLab()
    try:
        yield lab
    finally:
        lab.close()


def pytest_report_header(config):
    return [f"meshd binary: {MESHD_BIN}", f"grpcio {grpc.__version__}"]


def pytest_sessionfinish(session, exitstatus):
    _end_leftovers()


# --------------------------------------------------------------------------------------------
# A skip is a failure: it prints its reason and fails the run.
# --------------------------------------------------------------------------------------------


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, lineno, reason = longrepr
        return f"{reason} ({path}:{lineno})"
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.skipped and not hasattr(rep, "wasxfail"):
        reason = _skip_reason(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped tests fail this suite; skip reason: {reason}"
    return rep


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    rep = yield
    if rep.skipped:
        reason = _skip_reason(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped collection fails this suite; skip reason: {reason}"
    return rep
