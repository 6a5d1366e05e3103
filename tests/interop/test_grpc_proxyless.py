"""Proxyless gRPC against meshd with grpcio's own xDS client (reference §5.5).

meshd runs with --config-dir: a Service `echo` (port grpc 7070) whose endpoints are small gRPC
echo servers on 127.0.0.x, two in the local cluster and two in `cluster2` (EndpointSlices
annotated `meshd.io/cluster: cluster2`). A grpcio client in its own process (xds_client.py) gets
an xDS bootstrap pointing at meshd's plaintext port with node metadata GENERATOR=grpc, resolves
`xds:///echo.default.svc.cluster.local:7070` and calls /echo.Echo/Hello, which each server answers
with its id. grpcio walks LDS → RDS → CDS → EDS on its own; calls succeed only if meshd's
listeners, routes, clusters and endpoints are all accepted.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from conftest import child_env

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "xds_client.py"
SERVER = HERE / "xds_server.py"
HOST = "echo.default.svc.cluster.local"
PORT = 7070
NODE_ID = "sidecar~127.0.0.1~client.default~default.svc.cluster.local"
#: How long meshd may take to turn a file change into a push the client has applied.
CONVERGE_S = 30.0

SERVICE_YAML = f"""\
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  clusterIP: 10.96.0.70
  ports: [{{name: grpc, port: {PORT}, targetPort: {PORT}}}]
"""


# --------------------------------------------------------------------------------------------
# Echo servers (the endpoints)
# --------------------------------------------------------------------------------------------


class EchoServer:
    """A gRPC server on ip:0 whose /echo.Echo/Hello answers with its id."""

    def __init__(self, ident: str, ip: str):
        self.ident = ident
        self.ip = ip
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: self.ident.encode())
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("echo.Echo", {"Hello": handler}),)
        )
        self.port = self.server.add_insecure_port(f"{ip}:0")
        assert self.port, f"could not bind an echo server on {ip}"
        self.server.start()

    def stop(self):
        self.server.stop(grace=None).wait(10)


def slice_yaml(name: str, ip: str, port: int, cluster: str | None = None, service: str = "echo",
               pod: str | None = None) -> str:
    annotations = f"\n  annotations: {{meshd.io/cluster: {cluster}}}" if cluster else ""
    target = f"\n  targetRef: {{kind: Pod, name: {pod}, namespace: default}}" if pod else ""
    return f"""\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: default
  labels: {{kubernetes.io/service-name: {service}}}{annotations}
addressType: IPv4
ports: [{{name: grpc, port: {port}, protocol: TCP}}]
endpoints:
- addresses: ["{ip}"]
  conditions: {{ready: true}}{target}
"""


def pod_yaml(name: str, ip: str, version: str, cluster: str | None) -> str:
    annotations = f"\n  annotations: {{meshd.io/cluster: {cluster}}}" if cluster else ""
    return f"""\
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: echo, version: {version}}}{annotations}
spec: {{serviceAccountName: echo, containers: []}}
status: {{podIP: "{ip}"}}
"""


# --------------------------------------------------------------------------------------------
# The xDS client process
# --------------------------------------------------------------------------------------------


def bootstrap(xds_target: str, node_id: str = NODE_ID) -> dict:
    return {
        "xds_servers": [
            {
                "server_uri": xds_target,
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {
            "id": node_id,
            "metadata": {"GENERATOR": "grpc", "NAMESPACE": "default"},
            "locality": {},
        },
        "server_listener_resource_name_template": "xds.istio.io/grpc/lds/inbound/%s",
    }


def client_env(xds_target: str, node_id: str = NODE_ID) -> dict[str, str]:
    env = child_env()
    for k in list(env):
        # Nothing here may go through a proxy (grpc honours these for the xDS channel too).
        if k.lower() in ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy"):
            del env[k]
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    env["GRPC_XDS_BOOTSTRAP_CONFIG"] = json.dumps(bootstrap(xds_target, node_id))
    return env


class XdsClient:
    def __init__(self, target: str, xds_target: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(CLIENT), target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env(xds_target),
        )
        self._out: queue.Queue[str | None] = queue.Queue()
        self._err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self._out.put, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self._err.append, False), daemon=True).start()
        ready = self._read(30)
        assert ready.get("ready") == target, f"client did not start: {ready}"

    @staticmethod
    def _pump(stream, sink, mark_eof: bool):
        for line in stream:
            sink(line.rstrip("\n"))
        if mark_eof:
            sink(None)

    def _read(self, timeout: float) -> dict:
        try:
            line = self._out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"xDS client gave no answer in {timeout}s\n{self.stderr()}") from None
        if line is None:
            raise AssertionError(f"xDS client exited ({self.proc.poll()})\n{self.stderr()}")
        return json.loads(line)

    def calls(self, n: int, timeout: float = 5.0, metadata: list | None = None) -> dict:
        req = {"cmd": "call", "n": n, "timeout": timeout, "metadata": metadata or []}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read(n * timeout + 30)

    def stderr(self) -> str:
        return "\n".join(self._err[-50:])

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class XdsServer:
    """xds_server.py in its own process: a grpcio server with xds=True."""

    def __init__(self, addr: str, ident: str, node_id: str, xds_target: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), addr, ident],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env(xds_target, node_id),
        )
        self._err: list[str] = []
        threading.Thread(target=lambda: self._err.extend(l.rstrip() for l in self.proc.stderr), daemon=True).start()
        line = self.proc.stdout.readline()
        assert line and json.loads(line).get("started") == addr, f"xDS server did not start: {line!r}\n{self.stderr()}"

    def stderr(self) -> str:
        return "\n".join(self._err[-50:])

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def wait_for_calls(client: XdsClient, want, what: str, n: int = 20, metadata: list | None = None) -> dict:
    """Calls in batches of n until want(result) holds, or fails after CONVERGE_S."""
    deadline = time.monotonic() + CONVERGE_S
    last = None
    while time.monotonic() < deadline:
        last = client.calls(n, timeout=2.0, metadata=metadata)
        if want(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last batch: {last}\nclient stderr:\n{client.stderr()}")


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def echo_servers():
    servers = {
        "c1-a": EchoServer("c1-a", "127.0.0.11"),
        "c1-b": EchoServer("c1-b", "127.0.0.12"),
        "c2-a": EchoServer("c2-a", "127.0.0.21"),
        "c2-b": EchoServer("c2-b", "127.0.0.22"),
    }
    try:
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture
def mesh(tmp_path, meshd_factory, echo_servers):
    """meshd serving the config dir with echo's endpoints in both clusters."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "service.yaml").write_text(SERVICE_YAML)
    for ident, s in echo_servers.items():
        cluster = "cluster2" if ident.startswith("c2") else None
        (config / f"slice-{ident}.yaml").write_text(slice_yaml(f"echo-{ident}", s.ip, s.port, cluster))
    m = meshd_factory.start(
        "--ca-key-type", "ecdsa-p256",
        "--config-dir", str(config),
        "--config-dir-poll", "100ms",
    )
    return m, config


@pytest.fixture
def clients():
    started: list = []

    def start(target: str, xds_target: str) -> XdsClient:
        c = XdsClient(target, xds_target)
        started.append(c)
        return c

    def server(addr: str, ident: str, node_id: str, xds_target: str) -> XdsServer:
        srv = XdsServer(addr, ident, node_id, xds_target)
        started.append(srv)
        return srv

    start.server = server

    try:
        yield start
    finally:
        for c in started:
            c.stop()


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_grpcio_xds_client_spreads_calls_and_follows_endpoint_changes(mesh, clients, echo_servers):
    m, config = mesh
    client = clients(f"xds:///{HOST}:{PORT}", m.plaintext_target)

    # Every endpoint in both clusters is reached.
    everyone = set(echo_servers)
    seen: set[str] = set()

    def all_reached(r):
        seen.update(r["ok"])
        return seen == everyone and not r["errors"]

    wait_for_calls(client, all_reached, f"calls reaching all of {sorted(everyone)}", n=20)
    r = client.calls(40)
    assert not r["errors"], r
    assert sum(r["ok"].values()) == 40
    assert set(r["ok"]) == everyone, f"round robin over all four endpoints expected: {r}"

    # cluster2's endpoints go away: calls only reach cluster1.
    for ident in ("c2-a", "c2-b"):
        (config / f"slice-{ident}.yaml").unlink()
    cluster1 = {"c1-a", "c1-b"}
    wait_for_calls(client, lambda r: set(r["ok"]) == cluster1 and not r["errors"],
                   "calls reaching only cluster1")
    r = client.calls(20)
    assert set(r["ok"]) == cluster1 and not r["errors"], r

    # They come back: spread over both clusters again.
    for ident in ("c2-a", "c2-b"):
        srv = echo_servers[ident]
        (config / f"slice-{ident}.yaml").write_text(slice_yaml(f"echo-{ident}", srv.ip, srv.port, "cluster2"))
    seen.clear()
    wait_for_calls(client, all_reached, "calls reaching both clusters again")

    # meshd saw a gRPC client that ACKed every type it asked for, with nothing rejected.
    metrics = m.metrics()
    rejects = {k: v for k, v in metrics.items() if k.startswith("pilot_total_xds_rejects") and v}
    assert not rejects, f"the gRPC client rejected config: {rejects}\n{m.describe()}"
    for t in ("lds", "rds", "cds", "eds"):
        assert metrics.get(f'pilot_xds_pushes{{type="{t}"}}', 0) >= 1, f"no {t} response sent: {metrics}"


def test_short_names_and_unknown_hosts(mesh, clients, echo_servers):
    m, _ = mesh
    # A short name in the node's namespace resolves like the FQDN.
    short = clients(f"xds:///echo:{PORT}", m.plaintext_target)
    r = wait_for_calls(short, lambda r: sum(r["ok"].values()) == 10, "calls through the short name", n=10)
    assert set(r["ok"]) <= set(echo_servers)

    # A host meshd does not know: the listener does not exist, calls fail UNAVAILABLE.
    unknown = clients(f"xds:///nope.default.svc.cluster.local:{PORT}", m.plaintext_target)
    # grpc-core waits for its does-not-exist timer (15 s) on a name it never received.
    r = unknown.calls(1, timeout=30.0)
    assert not r["ok"], r
    assert any(k.startswith("UNAVAILABLE") and "does not exist" in k for k in r["errors"]), r


def test_grpcio_xds_server_serves_once_its_inbound_listener_arrives(tmp_path, meshd_factory, clients):
    """Both ends proxyless: a grpcio xds=True server gets `xds.istio.io/grpc/lds/inbound/<ip:port>`
    from meshd once the model has an endpoint of its own at that port, and a proxyless client
    reaches it through xds:///."""
    ip = "127.0.0.31"
    port = free_port(ip)
    config = tmp_path / "config"
    config.mkdir()
    (config / "service.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: srv, namespace: default}\n"
        f"spec:\n  ports: [{{name: grpc, port: {PORT}, targetPort: {port}}}]\n"
    )
    m = meshd_factory.start("--ca-key-type", "ecdsa-p256", "--config-dir", str(config), "--config-dir-poll", "100ms")
    node_id = f"sidecar~{ip}~srv-1.default~default.svc.cluster.local"
    server = clients.server(f"{ip}:{port}", "xds-server", node_id, m.plaintext_target)

    direct = grpc.insecure_channel(f"{ip}:{port}", options=[("grpc.enable_http_proxy", 0)])
    hello = direct.unary_unary("/echo.Echo/Hello")

    def call() -> str:
        try:
            return hello(b"ping", timeout=2).decode()
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"

    try:
        # No endpoint of the server's own yet: no listener for it, so it does not serve.
        time.sleep(1.0)
        assert call() != "xds-server", "served without an xDS listener"

        # Its endpoint appears: meshd sends the listener and the server starts serving.
        (config / "slice.yaml").write_text(slice_yaml("srv-1", ip, port, service="srv"))
        deadline = time.monotonic() + CONVERGE_S
        last = call()
        while last != "xds-server" and time.monotonic() < deadline:
            time.sleep(0.2)
            last = call()
        assert last == "xds-server", f"the xDS server never served; last call: {last}\n{server.stderr()}\n{m.describe()}"
    finally:
        direct.close()

    client = clients(f"xds:///srv.default.svc.cluster.local:{PORT}", m.plaintext_target)
    wait_for_calls(client, lambda r: r["ok"] == {"xds-server": 10}, "proxyless client → proxyless server", n=10)
    rejects = {k: v for k, v in m.metrics().items() if k.startswith("pilot_total_xds_rejects") and v}
    assert not rejects, rejects



ROUTING = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: default}}
spec:
  host: echo
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo.default.svc.cluster.local]
  http:
  - match: [{{headers: {{x-version: {{exact: v2}}}}}}]
    route: [{{destination: {{host: echo, subset: v2}}}}]
  - route:
    - {{destination: {{host: echo, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: echo, subset: v2}}, weight: {v2}}}
"""


def test_virtual_service_subsets_weights_and_header_match(mesh, clients, echo_servers):
    """DestinationRule subsets (version label from the pods) and a VirtualService: grpcio follows
    meshd's weighted clusters and header matches through RDS, CDS subsets and subset EDS."""
    m, config = mesh
    for ident, s in echo_servers.items():
        cluster = "cluster2" if ident.startswith("c2") else None
        version = "v2" if ident.startswith("c2") else "v1"
        (config / f"pod-{ident}.yaml").write_text(pod_yaml(f"echo-{ident}", s.ip, version, cluster))
        (config / f"slice-{ident}.yaml").write_text(
            slice_yaml(f"echo-{ident}", s.ip, s.port, cluster, pod=f"echo-{ident}"))
    (config / "routing.yaml").write_text(ROUTING.format(v1=100, v2=0))
    v1, v2 = {"c1-a", "c1-b"}, {"c2-a", "c2-b"}
    client = clients(f"xds:///{HOST}:{PORT}", m.plaintext_target)

    wait_for_calls(client, lambda r: set(r["ok"]) == v1 and not r["errors"], "the default route to subset v1")
    r = wait_for_calls(client, lambda r: set(r["ok"]) == v2 and not r["errors"], "the header match to subset v2",
                       metadata=[["x-version", "v2"]])
    assert sum(r["ok"].values()) == 20, r

    # A 50/50 split reaches both subsets.
    (config / "routing.yaml").write_text(ROUTING.format(v1=50, v2=50))
    seen: set[str] = set()

    def both(r):
        seen.update(r["ok"])
        return seen == v1 | v2 and not r["errors"]

    wait_for_calls(client, both, "a weighted split over both subsets", n=40)
    rejects = {k: v for k, v in m.metrics().items() if k.startswith("pilot_total_xds_rejects") and v}
    assert not rejects, rejects
