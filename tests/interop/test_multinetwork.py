"""Istio's "Install Primary-Remote on different networks", with real Envoys and real traffic.

Two networks (bridges that do not route to each other) and two fake Kubernetes API servers:

- cluster1, the primary, on network1: meshd (``--kubeconfig`` to cluster1, cluster2 from a remote
  secret), helloworld v1 (app + sidecar + istio-init capture), an uninjected helloworld
  endpoint, and the east-west gateway: a real Envoy configured by meshd (node type router,
  ``REQUESTED_NETWORK_VIEW=network1``, labels ``istio: eastwestgateway``) in a pod attached to
  network1 (its pod IP) and network2 (its "LoadBalancer IP"), serving Istio's
  ``cross-network-gateway`` (15443 AUTO_PASSTHROUGH) and ``expose-istiod`` (15012 and 15017
  PASSTHROUGH to meshd);
- cluster2, the remote, on network2: helloworld v2 and a curl client, both with sidecars. Their
  pods cannot reach network1 at all: they get certificates and xDS from meshd through the
  gateway's LoadBalancer IP:15012 (the server verified as istiod.istio-system.svc), with tokens
  of cluster2's API server, reviewed by cluster2.

The curl sidecar's EDS must show v2's pod IP and, for v1, the gateway's LoadBalancer IP:15443;
requests reach both, the v1 ones as mTLS that only v1's sidecar terminates.
"""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest

from conftest import MeshdLauncher
from envoy_helpers import b64, namespace, start_fake, wait_until
from netns import MESHD_HOST_FOR_PODS, NetLab
from sidecar import endpoint_slice_object, pod_object, service_object

SAMPLE = "sample"
HELLO = "helloworld"
HELLO_HOST = f"{HELLO}.{SAMPLE}.svc.cluster.local"
HELLO_IP = "10.96.0.50"
HELLO_PORT = 5000
HELLO_CLUSTER = f"outbound|{HELLO_PORT}||{HELLO_HOST}"
HELLO_SNI = f"outbound_.{HELLO_PORT}_._.{HELLO_HOST}"
SERVER_NAME = "istiod.istio-system.svc"
SYSTEM = "istio-system"
EW_LABELS = {"istio": "eastwestgateway", "app": "istio-eastwestgateway"}
INJECTED = {"security.istio.io/tlsMode": "istio"}
CONVERGE_S = 60.0


def eastwest_service(network: str, lb_ip: str) -> dict:
    """Istio's east-west gateway Service: LoadBalancer, network label, the four ports."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "istio-eastwestgateway",
            "namespace": SYSTEM,
            "labels": {**EW_LABELS, "topology.istio.io/network": network},
        },
        "spec": {
            "type": "LoadBalancer",
            "selector": {"istio": "eastwestgateway"},
            "ports": [
                {"name": "status-port", "port": 15021, "targetPort": 15021, "protocol": "TCP"},
                {"name": "tls", "port": 15443, "targetPort": 15443, "protocol": "TCP"},
                {"name": "tls-istiod", "port": 15012, "targetPort": 15012, "protocol": "TCP"},
                {"name": "tls-webhook", "port": 15017, "targetPort": 15017, "protocol": "TCP"},
            ],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}},
    }


def istiod_objects(address: str, grpc_port: int, webhook_port: int) -> list[dict]:
    """The primary's `istiod` Service (15012, 443→15017) and its endpoint: meshd."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "istiod", "namespace": SYSTEM},
            "spec": {
                "ports": [
                    {"name": "tcp-istiod", "port": 15012, "targetPort": grpc_port, "protocol": "TCP"},
                    {"name": "tcp-webhook", "port": 443, "targetPort": webhook_port, "protocol": "TCP"},
                ]
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "istiod-1", "namespace": SYSTEM, "labels": {"kubernetes.io/service-name": "istiod"}},
            "addressType": "IPv4",
            "ports": [
                {"name": "tcp-istiod", "port": grpc_port, "protocol": "TCP"},
                {"name": "tcp-webhook", "port": webhook_port, "protocol": "TCP"},
            ],
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        },
    ]


def istio_config() -> list[dict]:
    """samples/multicluster/expose-istiod.yaml and expose-services.yaml."""
    gw = lambda name, servers: {  # noqa: E731
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": SYSTEM},
        "spec": {"selector": {"istio": "eastwestgateway"}, "servers": servers},
    }
    istiod = f"istiod.{SYSTEM}.svc.cluster.local"
    return [
        gw("istiod-gateway", [
            {"port": {"name": "tls-istiod", "number": 15012, "protocol": "tls"}, "tls": {"mode": "PASSTHROUGH"}, "hosts": ["*"]},
            {"port": {"name": "tls-istiodwebhook", "number": 15017, "protocol": "tls"}, "tls": {"mode": "PASSTHROUGH"}, "hosts": ["*"]},
        ]),
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "istiod-vs", "namespace": SYSTEM},
            "spec": {
                "hosts": ["*"],
                "gateways": ["istiod-gateway"],
                "tls": [
                    {"match": [{"port": 15012, "sniHosts": ["*"]}], "route": [{"destination": {"host": istiod, "port": {"number": 15012}}}]},
                    {"match": [{"port": 15017, "sniHosts": ["*"]}], "route": [{"destination": {"host": istiod, "port": {"number": 443}}}]},
                ],
            },
        },
        gw("cross-network-gateway", [
            {"port": {"name": "tls", "number": 15443, "protocol": "TLS"}, "tls": {"mode": "AUTO_PASSTHROUGH"}, "hosts": ["*.local"]},
        ]),
    ]


class Mesh:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def describe(self) -> str:
        return self.lab.describe() + "\n--- meshd (tail) ---\n" + self.meshd.stderr.text()[-6000:]

    def debug(self, path: str):
        status, body = self.meshd.http_get("monitoring", path)
        assert status == 200, f"{path}: {status} {body}"
        return json.loads(body)

    def eds(self, sidecar, cluster: str) -> list[str]:
        """`address:port` of every endpoint Envoy holds for `cluster` (its config dump)."""
        dump = sidecar.envoy.config_section("EndpointsConfigDump")
        for c in dump.get("dynamic_endpoint_configs", []):
            cla = c.get("endpoint_config", {})
            if cla.get("cluster_name") != cluster:
                continue
            out = []
            for loc in cla.get("endpoints", []):
                for e in loc.get("lb_endpoints", []):
                    sa = e["endpoint"]["address"]["socket_address"]
                    out.append(f"{sa['address']}:{sa['port_value']}")
            return sorted(out)
        return []

    def hello(self, n: int) -> dict[str, int]:
        return self.curl.sample(f"http://{HELLO_HOST}:{HELLO_PORT}/", n)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    lab = NetLab()
    launcher = MeshdLauncher(tmp_path_factory)
    stops = []
    tmp = tmp_path_factory.mktemp("multinetwork")
    try:
        net1, net2 = lab.network("network1"), lab.network("network2")
        ew = lab.pod("istio-eastwestgateway-0", networks=[net1, net2], namespace=SYSTEM,
                     service_account="istio-eastwestgateway", labels={**EW_LABELS, "topology.istio.io/network": "network1"})
        lb_ip = ew.ip_on(net2)
        v1 = lab.pod("helloworld-v1-0", networks=[net1], namespace=SAMPLE, service_account=HELLO,
                     labels={"app": HELLO, "version": "v1", **INJECTED})
        naked = lab.pod("helloworld-naked-0", networks=[net1], namespace=SAMPLE, service_account=HELLO,
                        labels={"app": HELLO, "version": "naked"})
        v2 = lab.pod("helloworld-v2-0", networks=[net2], namespace=SAMPLE, service_account=HELLO,
                     labels={"app": HELLO, "version": "v2", **INJECTED})
        curl = lab.pod("curl-0", networks=[net2], namespace=SAMPLE, service_account="curl",
                       labels={"app": "curl", **INJECTED})
        lab.dns[HELLO_HOST] = HELLO_IP

        c1 = start_fake(tmp / "cluster1", "cluster1", "127.0.0.3")
        stops.append(c1.stop)
        c2 = start_fake(tmp / "cluster2", "cluster2", "127.0.0.4")
        stops.append(c2.stop)
        hello_svc = service_object(HELLO, SAMPLE, HELLO_IP, [("http", HELLO_PORT, HELLO_PORT)])
        c1.apply(
            namespace(SYSTEM, "network1"), namespace(SAMPLE),
            pod_object(ew), pod_object(v1), pod_object(naked),
            hello_svc, endpoint_slice_object(HELLO, SAMPLE, [v1, naked], HELLO_PORT),
            eastwest_service("network1", lb_ip),
        )
        c2.apply(
            namespace(SYSTEM, "network2"), namespace(SAMPLE),
            pod_object(v2), pod_object(curl),
            hello_svc, endpoint_slice_object(HELLO, SAMPLE, [v2], HELLO_PORT),
            # cluster2's own east-west gateway (not started here: nothing calls into network2).
            eastwest_service("network2", "192.0.2.2"),
        )
        kubeconfig = tmp / "cluster1.kubeconfig"
        kubeconfig.write_text((c1.state_dir / "kubeconfig-admin.yaml").read_text())
        meshd = launcher.start(
            "--kubeconfig", str(kubeconfig),
            "--cluster-id", "cluster1",
            "--network", "network1",
            "--ca-key-type", "ecdsa-p256",
            "--root-cert-configmaps", "false",
            "--debounce-after", "50ms",
            grpc_host=MESHD_HOST_FOR_PODS,
            plaintext_host=MESHD_HOST_FOR_PODS,
            webhook_host=MESHD_HOST_FOR_PODS,
        )
        c1.apply(
            *istiod_objects(net1.gateway, meshd.addrs["grpc-tls"][1], meshd.addrs["webhook"][1]),
            *istio_config(),
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "istio-remote-secret-cluster2", "namespace": SYSTEM,
                             "labels": {"istio/multiCluster": "true"},
                             "annotations": {"networking.istio.io/cluster": "cluster2"}},
                "data": {"cluster2": b64(c2.reader_kubeconfig())},
            },
        )
        m = Mesh(lab=lab, meshd=meshd, c1=c1, c2=c2, net1=net1, net2=net2, ew=ew, lb_ip=lb_ip,
                 v1=v1, v2=v2, naked=naked, curl=curl)
        wait_until("meshd knows both networks' gateways", CONVERGE_S,
                   lambda: len([g for g in m.debug("/debug/networkz")["gateways"] if not g["problem"]]) == 2,
                   m.describe)

        # The east-west gateway: network1, its own network only, a cluster1 token.
        ew.start_gateway(meshd, cluster_id="cluster1", network="network1",
                         token=c1.token(SYSTEM, "istio-eastwestgateway"),
                         metadata={"REQUESTED_NETWORK_VIEW": "network1"})
        for p in (v1, naked, v2):
            p.start_app(HELLO_PORT)
        v1.capture()
        v1.start_sidecar(meshd, cluster_id="cluster1", network="network1", token=c1.token(SAMPLE, HELLO))
        # cluster2's pods reach meshd only through the gateway's LoadBalancer IP.
        for p in (v2, curl):
            p.capture()
            p.start_sidecar(meshd, cluster_id="cluster2", network="network2",
                            token=c2.token(SAMPLE, p.service_account), discovery_addr=(lb_ip, 15012))
        yield m
    finally:
        try:
            lab.close()
        finally:
            try:
                launcher.close()
            finally:
                for s in reversed(stops):
                    s()


def test_cluster2_workloads_bootstrap_through_the_eastwest_gateway(mesh):
    # The remote pods have no route to network1 (where meshd is): everything went through 15012.
    for p in (mesh.v2, mesh.curl):
        with pytest.raises(Exception):
            p.run("python3", "-c", f"import socket; socket.create_connection(({mesh.net1.gateway!r}, "
                  f"{mesh.meshd.addrs['grpc-tls'][1]}), timeout=3)", timeout=20)
    assert mesh.curl.sidecar.agent.spiffe_id == "spiffe://cluster.local/ns/sample/sa/curl"
    conns = {c["node_id"]: c for c in mesh.debug("/debug/syncz")}
    for p in (mesh.v2, mesh.curl):
        c = conns.get(p.sidecar.node_id)
        assert c is not None, f"{p.name} has an ADS stream: {sorted(conns)}"
        assert c["cluster_id"] == "cluster2", "its token was reviewed by cluster2's API server"
    ew = mesh.ew.sidecar.envoy
    assert ew.stat("listener.0.0.0.0_15012.downstream_cx_total") >= 4, \
        "two certificates and two ADS streams came through the gateway's 15012"
    # 15017 (the Service's 443) passes TLS through to meshd's webhook server as well.
    ctx = ssl.create_default_context(cadata=mesh.meshd.root_pem.decode())
    with socket.create_connection((mesh.lb_ip, 15017), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            tls.sendall(b"GET /ready HTTP/1.1\r\nHost: istiod\r\nConnection: close\r\n\r\n")
            reply = tls.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]


def test_the_remote_sidecar_sees_v2_directly_and_v1_as_the_gateway(mesh):
    want = sorted([f"{mesh.v2.ip}:{HELLO_PORT}", f"{mesh.lb_ip}:15443"])
    wait_until("curl's EDS: v2's pod IP and cluster1's gateway", CONVERGE_S,
               lambda: mesh.eds(mesh.curl.sidecar, HELLO_CLUSTER) == want,
               lambda: f"EDS {mesh.eds(mesh.curl.sidecar, HELLO_CLUSTER)}\n{mesh.describe()}")
    # The uninjected pod is on network1 only: never offered to network2 (not even via the gateway).
    assert f"{mesh.naked.ip}:{HELLO_PORT}" not in mesh.eds(mesh.curl.sidecar, HELLO_CLUSTER)
    # The gateway's own SNI cluster holds network1's mTLS endpoints only.
    assert mesh.eds(mesh.ew.sidecar, HELLO_SNI) == [f"{mesh.v1.ip}:{HELLO_PORT}"]


def test_requests_reach_v1_through_the_gateway_and_v2_directly(mesh):
    v1_tls = mesh.v1.sidecar.stat("listener.0.0.0.0_15006.ssl.handshake")
    sni_cx = mesh.ew.sidecar.stat(f"tcp.{HELLO_SNI}.downstream_cx_total")
    counts = wait_until(
        "curl reaches both helloworld versions",
        CONVERGE_S,
        lambda: (lambda c: c if {mesh.v1.name, mesh.v2.name} <= set(c) else None)(mesh.hello(20)),
        mesh.describe,
    )
    assert mesh.naked.name not in counts, f"the uninjected network1 pod is unreachable from network2: {counts}"
    assert set(counts) == {mesh.v1.name, mesh.v2.name}, counts
    # v1's answers crossed the gateway's SNI chain as a TCP stream and were terminated by v1's
    # sidecar: mesh mTLS end to end.
    assert mesh.ew.sidecar.stat(f"tcp.{HELLO_SNI}.downstream_cx_total") > sni_cx
    assert mesh.v1.sidecar.stat("listener.0.0.0.0_15006.ssl.handshake") > v1_tls


def test_the_gateway_never_holds_application_keys(mesh):
    dump = mesh.ew.sidecar.envoy.config_dump()
    listeners = [c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump")][0]
    l15443 = [l for l in listeners.get("dynamic_listeners", []) if l["name"] == "0.0.0.0_15443"]
    assert l15443, "the AUTO_PASSTHROUGH listener"
    chains = l15443[0]["active_state"]["listener"]["filter_chains"]
    assert chains and all("transport_socket" not in c for c in chains), "no chain terminates TLS"
    assert any(HELLO_SNI in c["filter_chain_match"].get("server_names", []) for c in chains)
    # Nothing on 15443 refers to a certificate: the bytes are the client's mTLS, end to end.
    assert all("tls_certificate_sds_secret_configs" not in json.dumps(c) for c in chains)
    # The only key the gateway pod ever had is its own identity's.
    assert mesh.ew.sidecar.agent.spiffe_id == "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway"


def test_plaintext_and_foreign_tls_to_15443_get_nothing(mesh):
    with socket.create_connection((mesh.lb_ip, 15443), timeout=10) as s:
        s.settimeout(10)
        s.sendall(f"GET / HTTP/1.1\r\nHost: {HELLO_HOST}\r\n\r\n".encode())
        try:
            data = s.recv(1024)
        except (ConnectionResetError, socket.timeout):
            data = b""
    assert data == b"", f"a plaintext client got an answer: {data[:200]!r}"
    # TLS with the right SNI but without Istio's ALPN matches no chain either.
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((mesh.lb_ip, 15443), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            with ctx.wrap_socket(raw, server_hostname=HELLO_SNI) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
                if not tls.recv(1):
                    raise ConnectionResetError("closed")


def test_a_gateway_address_change_reaches_the_sidecar_within_the_debounce(mesh):
    new_ip = mesh.ew.add_address(mesh.net2)
    t0 = time.monotonic()
    mesh.c1.apply(eastwest_service("network1", new_ip))
    want = sorted([f"{mesh.v2.ip}:{HELLO_PORT}", f"{new_ip}:15443"])
    wait_until("curl's EDS follows the gateway's new address", 10.0,
               lambda: mesh.eds(mesh.curl.sidecar, HELLO_CLUSTER) == want,
               lambda: f"EDS {mesh.eds(mesh.curl.sidecar, HELLO_CLUSTER)}")
    elapsed = time.monotonic() - t0
    # Watch + 50 ms debounce + push: well under the 10 s debounce maximum.
    assert elapsed < 10.0
    counts = wait_until("v1 is reached at the new address", CONVERGE_S,
                        lambda: (lambda c: c if mesh.v1.name in c else None)(mesh.hello(10)), mesh.describe)
    assert mesh.v1.name in counts
