"""meshd restarted under connected clients: a real Envoy gateway and a grpcio proxyless client
keep serving from their last config while meshd is down, reconnect to the restarted meshd on the
same addresses, and resync.

Setup (standalone, no Kubernetes): meshd with --config-dir holding

- Service ``web`` (HTTP, port 80) whose EndpointSlice points at small HTTP backends on
  127.0.0.41/.42, plus a Gateway (``istio: ingressgateway``) and a VirtualService routing
  ``web.example.com`` to it — served to an Envoy gateway over plaintext ADS (SotW);
- Service ``echo`` (gRPC, port 7070) whose EndpointSlices point at gRPC echo servers on
  127.0.0.51/.52 — used by a grpcio xds:/// client (tests/interop/xds_client.py).

meshd listens on fixed loopback ports chosen free at test start; the second meshd uses the same
ports and the same --data-dir, so the root certificate must be unchanged. Every wait polls with a
deadline; every process is ended at teardown; a missing binary fails the test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    LISTENERS,
    MESHD_BIN,
    STARTUP_TIMEOUT_S,
    Meshd,
    parse_listeners,
    spawn,
)
from envoy_helpers import (
    ISTIO_VERSION,
    Backend,
    envoy_binary,
    envoy_bootstrap,
    free_port,
    start_envoy,
    wait_until,
)
from test_grpc_proxyless import EchoServer, XdsClient, slice_yaml

GW_NS = "istio-system"
GW_NODE_ID = f"router~127.0.0.20~gw-1.{GW_NS}~{GW_NS}.svc.cluster.local"
GRPC_NODE_ID = "sidecar~127.0.0.1~client.default~default.svc.cluster.local"
CLUSTER_ID = "cluster1"
WEB_HOST = "web.example.com"
WEB_FQDN = "web.default.svc.cluster.local"
ECHO_FQDN = "echo.default.svc.cluster.local"
ECHO_PORT = 7070
#: HTTP backends (Envoy's upstreams) and gRPC echo servers (grpcio's upstreams).
HTTP_BACKENDS = {"web-a": "127.0.0.41", "web-b": "127.0.0.42"}
GRPC_BACKENDS = {"grpc-a": "127.0.0.51", "grpc-b": "127.0.0.52"}

#: Deadlines (seconds). grpcio's xDS reconnect backoff and Envoy's ADS retry backoff both grow
#: while meshd is down, so convergence after the restart gets a generous deadline.
CONVERGE_S = 60.0
DISCONNECT_S = 30.0


# --------------------------------------------------------------------------------------------
# Config-dir objects
# --------------------------------------------------------------------------------------------


def web_yaml(backend_port: int, gw_http_port: int, extra_route: bool = False) -> str:
    extra = (
        "  - name: after-restart\n"
        "    match: [{uri: {prefix: /after-restart}}]\n"
        f"    route: [{{destination: {{host: {WEB_FQDN}, port: {{number: 80}}}}}}]\n"
        "    timeout: 7s\n"
    ) if extra_route else ""
    return f"""\
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: 10.96.0.80
  ports: [{{name: http, port: 80, targetPort: {backend_port}, protocol: TCP}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: {GW_NS}}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {gw_http_port}, name: http, protocol: HTTP}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: [{WEB_HOST}]
  gateways: [{GW_NS}/ingress]
  http:
{extra}  - route: [{{destination: {{host: {WEB_FQDN}, port: {{number: 80}}}}}}]
"""


#: A Service added after the restart: a cluster Envoy never had, so its CDS state changes.
WEB2_YAML = """\
apiVersion: v1
kind: Service
metadata: {name: web2, namespace: default}
spec:
  clusterIP: 10.96.0.81
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
"""


ECHO_SERVICE_YAML = f"""\
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  clusterIP: 10.96.0.70
  ports: [{{name: grpc, port: {ECHO_PORT}, targetPort: {ECHO_PORT}}}]
"""


def web_slice_yaml(ip: str, port: int) -> str:
    return f"""\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-main
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: {port}, protocol: TCP}}]
endpoints:
- addresses: ["{ip}"]
  conditions: {{ready: true}}
"""


def write_atomically(path: Path, text: str):
    """Writes via rename so meshd's poller never reads a half-written file."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# meshd on fixed addresses
# --------------------------------------------------------------------------------------------


def fixed_addrs(taken: set[int]) -> dict[str, str]:
    """One free loopback port per listener (none of `taken`), chosen once; both meshd runs use them."""
    ports: set[int] = set()
    while len(ports) < len(LISTENERS):
        p = free_port("127.0.0.1")
        if p not in taken:
            ports.add(p)
    return {name: f"127.0.0.1:{p}" for name, p in zip(LISTENERS, sorted(ports))}


def start_meshd_fixed(data_dir: Path, addrs: dict[str, str], *extra: str) -> Meshd:
    """`meshd serve` on the given addresses; waits for its four listener lines."""
    if not (MESHD_BIN.is_file() and MESHD_BIN.stat().st_mode & 0o111):
        pytest.fail(f"meshd binary {MESHD_BIN} is missing: run `cargo build --all-targets` or set MESHD_BIN")
    args = [
        "serve",
        "--standalone",
        "--data-dir", str(data_dir),
        "--grpc-addr", addrs["grpc-tls"],
        "--plaintext-addr", addrs["grpc-plaintext"],
        "--monitoring-addr", addrs["monitoring"],
        "--ready-addr", addrs["ready"],
        "--webhook-addr", "127.0.0.1:0",
        "--log-format", "text",
        "--log-level", "info",
        "--shutdown-duration", "2s",
        *extra,
    ]
    proc, stderr = spawn([MESHD_BIN, *args])
    m = Meshd(proc=proc, data_dir=data_dir, args=args, stderr=stderr)
    ok = m.stderr.wait(lambda lines: set(LISTENERS) <= set(parse_listeners(lines)),
                       time.monotonic() + STARTUP_TIMEOUT_S)
    if not ok:
        state = f"exited with {proc.poll()}" if proc.poll() is not None else "still running"
        m.stop()
        raise AssertionError(f"meshd did not report all listeners within {STARTUP_TIMEOUT_S}s ({state})\n{m.describe()}")
    m.addrs = parse_listeners(m.stderr.lines())
    want = {name: (a.rpartition(":")[0], int(a.rpartition(":")[2])) for name, a in addrs.items()}
    got = {name: m.addrs.get(name) for name in want}
    assert got == want, f"meshd listens on {m.addrs}, asked for {want}\n{m.describe()}"
    return m


# --------------------------------------------------------------------------------------------
# Envoy (plaintext ADS)
# --------------------------------------------------------------------------------------------


def plaintext_bootstrap(xds_host: str, xds_port: int) -> dict:
    node = {
        "id": GW_NODE_ID,
        "cluster": f"istio-ingressgateway.{GW_NS}",
        "metadata": {
            "CLUSTER_ID": CLUSTER_ID,
            "NAMESPACE": GW_NS,
            "SERVICE_ACCOUNT": "istio-ingressgateway",
            "LABELS": {"istio": "ingressgateway"},
            "ISTIO_VERSION": ISTIO_VERSION,
        },
    }
    return envoy_bootstrap(node, (xds_host, xds_port), xds_connect_timeout="2s")


def http_get(port: int, host: str = WEB_HOST, path: str = "/") -> tuple[int, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def sample(port: int, n: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _ in range(n):
        try:
            status, body = http_get(port)
            key = body if status == 200 else f"HTTP {status}"
        except OSError as e:
            key = f"error {e!r}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def dump_versions(envoy) -> dict[str, object]:
    """What Envoy's config_dump says it applied: the CDS and LDS version_info (Envoy advances these
    only when an update changed some resource), each dynamic route config's version_info and
    routes, and the dynamic cluster names."""
    dump = envoy.config_dump()

    def section(name):
        found = [c for c in dump["configs"] if c["@type"] == f"type.googleapis.com/envoy.admin.v3.{name}"]
        return found[0] if found else {}

    rds = {}
    for r in section("RoutesConfigDump").get("dynamic_route_configs", []):
        rc = r["route_config"]
        names = [rt.get("name", "") for vh in rc.get("virtual_hosts", []) for rt in vh.get("routes", [])]
        rds[rc["name"]] = {"version": r.get("version_info", ""), "routes": names}
    clusters = [c["cluster"]["name"] for c in section("ClustersConfigDump").get("dynamic_active_clusters", [])]
    return {
        "cds": section("ClustersConfigDump").get("version_info", ""),
        "lds": section("ListenersConfigDump").get("version_info", ""),
        "rds": rds,
        "clusters": sorted(clusters),
    }


def epoch_of(version: str) -> str:
    assert "/" in version, f"meshd versions are <epoch>/<n>: {version!r}"
    return version.split("/", 1)[0]


def syncz(m: Meshd) -> list[dict]:
    status, body = m.http_get("monitoring", "/debug/syncz")
    assert status == 200, f"/debug/syncz: {status} {body}"
    return json.loads(body)


def conn_of(m: Meshd, node_id: str) -> dict | None:
    conns = [c for c in syncz(m) if c["node_id"] == node_id]
    return conns[0] if len(conns) == 1 else None


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------


@pytest.fixture
def stops():
    """Stop callbacks, run in reverse order at teardown whatever the outcome."""
    cbs: list = []
    try:
        yield cbs
    finally:
        errors = []
        for cb in reversed(cbs):
            try:
                cb()
            except Exception as e:  # keep ending the others
                errors.append(e)
        if errors:
            raise errors[0]


def test_meshd_restart_under_connected_clients_they_resync(tmp_path, stops):
    envoy_binary()  # fail early (never skip) when there is no envoy

    # -- upstreams -----------------------------------------------------------------------------
    backend_port = None
    http_backends: dict[str, Backend] = {}
    for _ in range(20):
        backend_port = free_port("127.0.0.41")
        try:
            for name, ip in HTTP_BACKENDS.items():
                http_backends[name] = Backend(name, ip, backend_port)
            break
        except OSError:
            for b in http_backends.values():
                b.stop()
            http_backends.clear()
    assert len(http_backends) == len(HTTP_BACKENDS), "no port free on every HTTP backend address"
    for b in http_backends.values():
        stops.append(b.stop)
    grpc_backends = {name: EchoServer(name, ip) for name, ip in GRPC_BACKENDS.items()}
    for s in grpc_backends.values():
        stops.append(s.stop)

    # -- config dir: only web-a and grpc-a at first --------------------------------------------
    gw_http_port = free_port("0.0.0.0")
    config = tmp_path / "config"
    config.mkdir()
    (config / "web.yaml").write_text(web_yaml(backend_port, gw_http_port))
    (config / "web-slice.yaml").write_text(web_slice_yaml(HTTP_BACKENDS["web-a"], backend_port))
    (config / "echo.yaml").write_text(ECHO_SERVICE_YAML)
    ga = grpc_backends["grpc-a"]
    (config / "echo-slice.yaml").write_text(slice_yaml("echo-main", ga.ip, ga.port))

    # -- meshd #1 ------------------------------------------------------------------------------
    data_dir = tmp_path / "meshd-data"
    addrs = fixed_addrs({gw_http_port, backend_port})
    meshd_args = (
        "--ca-key-type", "ecdsa-p256",
        "--cluster-id", CLUSTER_ID,
        "--config-dir", str(config),
        "--config-dir-poll", "100ms",
        "--debounce-after", "50ms",
    )
    current: dict[str, Meshd] = {}

    def stop_current():
        if "m" in current:
            current["m"].stop()

    stops.append(stop_current)
    m1 = start_meshd_fixed(data_dir, addrs, *meshd_args)
    current["m"] = m1
    root_before = m1.root_pem
    assert b"BEGIN CERTIFICATE" in root_before

    # -- clients -------------------------------------------------------------------------------
    xds_host, xds_port = m1.addrs["grpc-plaintext"]
    envoy = start_envoy(tmp_path / "envoy", plaintext_bootstrap(xds_host, xds_port))
    stops.append(envoy.stop)
    client = XdsClient(f"xds:///{ECHO_FQDN}:{ECHO_PORT}", m1.plaintext_target)
    stops.append(client.stop)

    def describe() -> str:
        tail = lambda s, n=5000: s[-n:]  # noqa: E731
        m = current.get("m")
        return (
            f"--- envoy stderr (tail) ---\n{tail(envoy.stderr.text())}\n"
            f"--- grpc client stderr ---\n{client.stderr()}\n"
            f"--- meshd #1 stderr (tail) ---\n{tail(m1.stderr.text())}\n"
            + (f"--- current meshd stderr (tail) ---\n{tail(m.stderr.text())}" if m is not None and m is not m1 else "")
        )

    def grpc_only(ident: str):
        def check():
            r = client.calls(10, timeout=2.0)
            return r["ok"] == {ident: 10} and not r["errors"]
        return check

    wait_until("HTTP through Envoy reaches web-a", CONVERGE_S, lambda: sample(gw_http_port, 10) == {"web-a": 10}, describe)
    wait_until("grpcio calls reach grpc-a", CONVERGE_S, grpc_only("grpc-a"), describe)
    wait_until("meshd #1 lists both xDS connections", CONVERGE_S,
               lambda: conn_of(m1, GW_NODE_ID) and conn_of(m1, GRPC_NODE_ID), describe)
    assert envoy.stat("control_plane.connected_state") == 1

    route_name = f"http.{gw_http_port}"
    before = wait_until("Envoy's config_dump has CDS, LDS and RDS versions", CONVERGE_S,
                        lambda: (v := dump_versions(envoy))["cds"] and v["lds"] and route_name in v["rds"] and v,
                        describe)
    old_epoch = epoch_of(before["cds"])
    assert epoch_of(before["lds"]) == old_epoch, before
    assert epoch_of(before["rds"][route_name]["version"]) == old_epoch, before
    gw_conn = conn_of(m1, GW_NODE_ID)
    assert gw_conn["types"]["cds"]["version_sent"] == before["cds"], (gw_conn, before)

    # -- meshd goes away (SIGTERM) ---------------------------------------------------------------
    m1.proc.send_signal(signal.SIGTERM)
    try:
        rc = m1.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"meshd did not exit within 30s of SIGTERM\n{describe()}") from None
    assert rc == 0, f"meshd exited with {rc} after SIGTERM\n{describe()}"
    m1.stop()  # closes its pipes
    current.pop("m")

    wait_until("Envoy notices the control plane is gone", DISCONNECT_S,
               lambda: envoy.stat("control_plane.connected_state") == 0, describe)
    # Envoy and grpcio keep serving from their last config while there is no control plane.
    down_http = sample(gw_http_port, 20)
    assert down_http == {"web-a": 20}, f"traffic through Envoy while meshd is down: {down_http}\n{describe()}"
    down_grpc = client.calls(10, timeout=2.0)
    assert down_grpc == {"ok": {"grpc-a": 10}, "errors": {}}, f"grpcio calls while meshd is down: {down_grpc}\n{describe()}"

    # -- meshd #2: same addresses, same data dir -------------------------------------------------
    m2 = start_meshd_fixed(data_dir, addrs, *meshd_args)
    current["m"] = m2
    assert m2.root_pem == root_before, "the restarted meshd kept the root in the same data dir"

    # The endpoints change after the restart: only the new meshd can tell the clients. A route and a
    # Service are added too, so Envoy applies (and its config_dump versions) RDS and CDS updates
    # from the new meshd (Envoy keeps the old version_info when a response changes nothing).
    write_atomically(config / "web-slice.yaml", web_slice_yaml(HTTP_BACKENDS["web-b"], backend_port))
    gb = grpc_backends["grpc-b"]
    write_atomically(config / "echo-slice.yaml", slice_yaml("echo-main", gb.ip, gb.port))
    write_atomically(config / "web.yaml", web_yaml(backend_port, gw_http_port, extra_route=True))
    write_atomically(config / "web2.yaml", WEB2_YAML)

    wait_until("Envoy reconnects to the restarted meshd", CONVERGE_S,
               lambda: envoy.stat("control_plane.connected_state") == 1, describe)
    wait_until("HTTP through Envoy follows the change to web-b", CONVERGE_S,
               lambda: sample(gw_http_port, 10) == {"web-b": 10}, describe)
    wait_until("grpcio calls follow the change to grpc-b", CONVERGE_S, grpc_only("grpc-b"), describe)
    wait_until("the restarted meshd lists both xDS connections", CONVERGE_S,
               lambda: conn_of(m2, GW_NODE_ID) and conn_of(m2, GRPC_NODE_ID), describe)

    # Stable: all traffic on the new endpoints, nothing rejected by either client.
    assert sample(gw_http_port, 20) == {"web-b": 20}
    r = client.calls(20, timeout=2.0)
    assert r == {"ok": {"grpc-b": 20}, "errors": {}}, r
    rejects = {k: v for k, v in m2.metrics().items() if k.startswith("pilot_total_xds_rejects") and v}
    assert not rejects, f"config from the restarted meshd was rejected: {rejects}\n{describe()}"

    # Envoy's config comes from the new meshd: the versions of what it applied carry a new epoch.
    web2_cluster = "outbound|80||web2.default.svc.cluster.local"
    after = wait_until(
        "Envoy's config_dump shows the new route and cluster at the new meshd's versions",
        CONVERGE_S,
        lambda: (v := dump_versions(envoy))["cds"] and epoch_of(v["cds"]) != old_epoch
        and web2_cluster in v["clusters"]
        and "after-restart" in v["rds"].get(route_name, {}).get("routes", [])
        and epoch_of(v["rds"][route_name]["version"]) != old_epoch and v,
        lambda: f"before: {before}\nnow: {dump_versions(envoy)}\n{describe()}",
    )
    new_epoch = epoch_of(after["cds"])
    assert new_epoch != old_epoch
    assert epoch_of(after["rds"][route_name]["version"]) == new_epoch, after

    # Every type on Envoy's new stream was sent by the new meshd (nonces are <epoch>-<n>) and
    # ACKed; CDS's version is the one Envoy shows.
    def all_acked_from_new_meshd():
        c = conn_of(m2, GW_NODE_ID)
        if not c or c["types"].get("cds", {}).get("version_sent") != after["cds"]:
            return False
        for t in ("cds", "eds", "lds", "rds"):
            st = c["types"].get(t)
            if not (st and st.get("nonce_sent") and st.get("nonce_acked") == st["nonce_sent"]):
                return False
            if epoch_of(st["version_sent"]) != new_epoch or not st["nonce_sent"].startswith(new_epoch + "-"):
                return False
        return True

    wait_until("meshd #2 sees Envoy ACK every type at its own versions", CONVERGE_S, all_acked_from_new_meshd,
               lambda: f"syncz: {json.dumps(syncz(m2), indent=1)}\nenvoy: {after}")
    assert sample(gw_http_port, 5) == {"web-b": 5}
    status, body = http_get(gw_http_port, path="/after-restart")
    assert (status, body) == (200, "web-b"), "the route added after the restart serves"

    # The root on disk never changed.
    assert m2.root_pem == root_before
