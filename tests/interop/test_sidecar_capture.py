"""Application traffic through meshd-configured sidecars, captured the way istio-init does it.

One network (a bridge), two pods (network namespaces), each with istio-init's nat rules, an
istio-agent stand-in (certificate from meshd, SDS on a Unix socket) and Envoy as uid 1337:

- ``web-0``: an HTTP app on its pod IP, port 8080, the only endpoint of Service ``web``
  (cluster IP 10.96.0.80, port ``http`` 80 → 8080);
- ``sleep-0``: a client.

meshd serves the mesh from ``--config-dir`` (Service, Pods, EndpointSlice) and hands out the
workload certificates. The tests check that

1. a request from ``sleep-0`` to ``web.default.svc.cluster.local`` (the cluster IP) is captured
   by sleep's sidecar (virtualOutbound, 15001), leaves as ISTIO_MUTUAL mTLS (meshd-issued
   certificates over SDS, the server's SPIFFE id verified), is captured by web's sidecar
   (virtualInbound, 15006) on its mTLS chain and reaches the app from 127.0.0.6;
2. a plaintext request from the test process (root namespace) straight to web's pod IP:8080 is
   captured too and answered through the plaintext chain (PERMISSIVE, Istio's default);
3. the ports istio-init excludes (15090, Envoy's Prometheus listener) are not captured;

and that networks are isolated from each other, which the multi-network tests rely on.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.request

import pytest

from conftest import MeshdLauncher
from envoy_helpers import wait_until
from netns import MESHD_HOST_FOR_PODS, NetLab, NetnsError
from sidecar import ConfigDir, endpoint_slice_object, pod_object, service_object

CLUSTER_ID = "cluster1"
WEB_IP = "10.96.0.80"
WEB_HOST = "web.default.svc.cluster.local"
APP_PORT = 8080
WEB_SPIFFE = "spiffe://cluster.local/ns/default/sa/web"
SLEEP_SPIFFE = "spiffe://cluster.local/ns/default/sa/sleep"
WEB_CLUSTER = f"outbound|80||{WEB_HOST}"
CONVERGE_S = 60.0


class Mesh:
    def __init__(self, lab, meshd, web, sleep, app):
        self.lab, self.meshd, self.web, self.sleep, self.app = lab, meshd, web, sleep, app

    def describe(self) -> str:
        return self.lab.describe() + "\n--- meshd (tail) ---\n" + self.meshd.stderr.text()[-4000:]

    def syncz(self) -> list[dict]:
        status, body = self.meshd.http_get("monitoring", "/debug/syncz")
        assert status == 200, f"/debug/syncz: {status} {body}"
        return json.loads(body)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    lab = NetLab()
    launcher = MeshdLauncher(tmp_path_factory)
    try:
        net1 = lab.network("network1")
        web = lab.pod("web-0", networks=[net1])
        sleep = lab.pod("sleep-0", networks=[net1])
        config = ConfigDir(tmp_path_factory.mktemp("sidecar-config"))
        config.write(
            "web",
            service_object("web", "default", WEB_IP, [("http", 80, APP_PORT)]),
            pod_object(web),
            pod_object(sleep),
            endpoint_slice_object("web", "default", [web], APP_PORT),
        )
        lab.dns[WEB_HOST] = WEB_IP
        meshd = launcher.start(
            "--ca-key-type", "ecdsa-p256",
            "--cluster-id", CLUSTER_ID,
            "--config-dir", str(config.path),
            "--config-dir-poll", "100ms",
            "--debounce-after", "50ms",
            grpc_host=MESHD_HOST_FOR_PODS,
            plaintext_host=MESHD_HOST_FOR_PODS,
        )
        app = web.start_app(APP_PORT)
        for pod in (web, sleep):
            pod.capture()
            pod.start_sidecar(meshd, cluster_id=CLUSTER_ID)
        yield Mesh(lab, meshd, web, sleep, app)
    finally:
        try:
            lab.close()
        finally:
            launcher.close()


def _root_get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return r.status, r.read().decode()


def test_sidecars_have_meshd_certificates_and_config(mesh):
    for pod, spiffe in ((mesh.web, WEB_SPIFFE), (mesh.sleep, SLEEP_SPIFFE)):
        agent = pod.sidecar.agent
        assert agent.spiffe_id == spiffe, f"{pod.name}'s certificate from meshd"
        assert {"default", "ROOTCA"} <= agent.acked_names(), f"{pod.name}'s Envoy ACKed both secrets\n{agent.describe()}"
        assert not agent.nacks(), agent.describe()
    conns = {c["node_id"]: c for c in mesh.syncz()}
    for pod, spiffe in ((mesh.web, WEB_SPIFFE), (mesh.sleep, SLEEP_SPIFFE)):
        c = conns.get(pod.sidecar.node_id)
        assert c is not None, f"meshd has an ADS stream for {pod.sidecar.node_id}: {sorted(conns)}"
        assert c["cluster_id"] == CLUSTER_ID
        assert c["identity"] == spiffe, "ADS over TLS authenticated by the pod's token"
    # web serves 8080 (its pod IP is the Service's endpoint): mTLS + plaintext chains; sleep none.
    def inbound_chains(pod):
        listeners = pod.sidecar.envoy.config_section("ListenersConfigDump").get("dynamic_listeners", [])
        vi = [l for l in listeners if l["name"] == "virtualInbound"]
        assert vi and "active_state" in vi[0], f"{pod.name} has an active virtualInbound"
        return {c.get("name") for c in vi[0]["active_state"]["listener"]["filter_chains"]}

    assert {f"0.0.0.0_{APP_PORT}_mtls", f"0.0.0.0_{APP_PORT}_plaintext"} <= inbound_chains(mesh.web)
    assert not any(str(APP_PORT) in (n or "") for n in inbound_chains(mesh.sleep))


def test_request_between_sidecars_is_captured_and_mutual_tls(mesh):
    web, sleep = mesh.web.sidecar, mesh.sleep.sidecar
    before = {
        "outbound_cx": sleep.stat("listener.0.0.0.0_80.downstream_cx_total"),
        "upstream_200": sleep.stat(f"cluster.{WEB_CLUSTER}.upstream_rq_200"),
        "upstream_tls": sleep.stat(f"cluster.{WEB_CLUSTER}.ssl.handshake"),
        "inbound_tls": web.stat("listener.0.0.0.0_15006.ssl.handshake"),
        "inbound_rq": web.stat(f"http.inbound_0.0.0.0_{APP_PORT}.downstream_rq_total"),
        "app_200": web.stat(f"cluster.inbound|{APP_PORT}||.upstream_rq_200"),
    }

    res = wait_until(
        "sleep-0 → web through both sidecars answers 200",
        CONVERGE_S,
        lambda: (r := mesh.sleep.http_get(f"http://{WEB_HOST}/echo")).status == 200 and r,
        mesh.describe,
    )
    echo = res.json()
    assert echo["name"] == "web-0"
    assert echo["peer"] == "127.0.0.6", "the app was called by web's sidecar (inbound cluster bind address)"
    assert echo["headers"]["host"] == WEB_HOST
    assert "x-request-id" in echo["headers"], "an Envoy HTTP connection manager handled the request"

    n = 5
    counts = mesh.sleep.sample(f"http://{WEB_HOST}/", n)
    assert counts == {"web-0": n}, counts
    status = mesh.sleep.http_get(f"http://{WEB_IP}/").status
    assert status == 200, "the cluster IP without a host name routes too"

    after = {
        "outbound_cx": sleep.stat("listener.0.0.0.0_80.downstream_cx_total"),
        "upstream_200": sleep.stat(f"cluster.{WEB_CLUSTER}.upstream_rq_200"),
        "upstream_tls": sleep.stat(f"cluster.{WEB_CLUSTER}.ssl.handshake"),
        "inbound_tls": web.stat("listener.0.0.0.0_15006.ssl.handshake"),
        "inbound_rq": web.stat(f"http.inbound_0.0.0.0_{APP_PORT}.downstream_rq_total"),
        "app_200": web.stat(f"cluster.inbound|{APP_PORT}||.upstream_rq_200"),
    }
    moved = {k: after[k] - before[k] for k in before}
    detail = f"stat deltas {moved}\n{mesh.describe()}"
    # The app's connections were captured to sleep's virtualOutbound, which handed them (original
    # destination 10.96.0.80:80) to the outbound listener 0.0.0.0_80; each request to web's cluster.
    assert moved["outbound_cx"] >= n + 2, detail
    assert moved["upstream_200"] >= n + 2, detail
    # Upstream TLS from sleep's sidecar, terminated by web's virtualInbound.
    assert moved["upstream_tls"] >= 1 and moved["inbound_tls"] >= 1, detail
    assert moved["inbound_rq"] >= n + 2 and moved["app_200"] >= n + 2, detail
    assert sleep.stat(f"cluster.{WEB_CLUSTER}.ssl.fail_verify_san") == 0
    assert web.stat("listener.0.0.0.0_15006.ssl.no_certificate") == 0, "sleep presented its certificate"
    assert web.stat("listener.0.0.0.0_15006.no_filter_chain_match") == 0

    # The outbound cluster is ISTIO_MUTUAL: meshd's SDS names, web's SPIFFE id required.
    clusters = sleep.envoy.config_section("ClustersConfigDump").get("dynamic_active_clusters", [])
    web_cluster = [c["cluster"] for c in clusters if c["cluster"]["name"] == WEB_CLUSTER]
    assert web_cluster, [c["cluster"]["name"] for c in clusters]
    tls = web_cluster[0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert [s["name"] for s in tls["tls_certificate_sds_secret_configs"]] == ["default"]
    combined = tls["combined_validation_context"]
    assert combined["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    sans = [m["matcher"]["exact"] for m in combined["default_validation_context"]["match_typed_subject_alt_names"]]
    assert sans == [WEB_SPIFFE]


def test_plaintext_to_the_pod_ip_is_captured_permissive(mesh):
    web = mesh.web.sidecar
    tls_before = web.stat("listener.0.0.0.0_15006.ssl.handshake")
    rq_before = web.stat(f"http.inbound_0.0.0.0_{APP_PORT}.downstream_rq_total")
    cx_before = web.stat("listener.0.0.0.0_15006.downstream_cx_total")

    status, body = _root_get(f"http://{mesh.web.ip}:{APP_PORT}/echo")
    assert status == 200
    echo = json.loads(body)
    assert echo["name"] == "web-0"
    assert echo["peer"] == "127.0.0.6", "the plaintext request went through web's sidecar, not straight to the app"

    assert web.stat("listener.0.0.0.0_15006.downstream_cx_total") == cx_before + 1, "captured to 15006"
    assert web.stat(f"http.inbound_0.0.0.0_{APP_PORT}.downstream_rq_total") == rq_before + 1
    assert web.stat("listener.0.0.0.0_15006.ssl.handshake") == tls_before, "the plaintext chain, no TLS"


def test_excluded_ports_are_not_captured(mesh):
    web = mesh.web.sidecar
    cx_before = web.stat("listener.0.0.0.0_15006.downstream_cx_total")
    status, body = _root_get(f"http://{mesh.web.ip}:15090/stats/prometheus")
    assert status == 200 and "envoy_server_live" in body, body[:500]
    assert web.stat("listener.0.0.0.0_15006.downstream_cx_total") == cx_before, "15090 is not redirected to 15006"
    rules = mesh.web.iptables_save()
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN" in rules, rules


def test_networks_are_isolated_and_a_pod_can_span_two(netlab):
    """The harness's own guarantee for multi-network tests: a pod reaches only the networks it is
    attached to (no default route, no forwarding in the root namespace)."""
    net1, net2 = netlab.network("network1"), netlab.network("network2")
    a = netlab.pod("a-0", networks=[net1])
    b = netlab.pod("b-0", networks=[net2])
    gw = netlab.pod("eastwest-0", networks=[net1, net2], namespace="istio-system")
    assert ipaddress.ip_address(a.ip) in net1.subnet and ipaddress.ip_address(b.ip) in net2.subnet
    assert gw.ip_on(net1) == gw.ip and ipaddress.ip_address(gw.ip_on(net2)) in net2.subnet
    lb_ip = gw.add_address(net2)
    netlab.pod("c-0", networks=[net1]).start_app(APP_PORT, name="c")
    a.start_app(APP_PORT)
    b.start_app(APP_PORT)

    assert a.http_get(f"http://{netlab.pods['c-0'].ip}:{APP_PORT}/").body == "c", "same network"
    assert _root_get(f"http://{b.ip}:{APP_PORT}/") == (200, "b-0"), "the root namespace reaches every network"
    assert gw.http_get(f"http://{a.ip}:{APP_PORT}/").body == "a-0"
    assert gw.http_get(f"http://{b.ip}:{APP_PORT}/").body == "b-0"
    gw.start_app(APP_PORT, name="gw-lb", ip=lb_ip)
    assert b.http_get(f"http://{lb_ip}:{APP_PORT}/").body == "gw-lb", "network2 reaches the gateway's extra address"
    for src, dst in ((b, a.ip), (a, b.ip), (b, net1.gateway), (a, lb_ip)):
        with pytest.raises(NetnsError, match="Network is unreachable"):
            src.http_get(f"http://{dst}:{APP_PORT}/", timeout=2)
