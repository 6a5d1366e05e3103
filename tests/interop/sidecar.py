"""Sidecars for the pods of tests/interop/netns.py: an istio-agent stand-in and Envoy.

``start_sidecar(pod, meshd)`` (also ``pod.start_sidecar(meshd)``) does what a sidecar-injected
pod's istio-proxy container does:

1. **istio-agent's CA client**: ``meshd cert`` run *inside the pod* as uid 1337 (so it passes
   the pod's capture, as the agent does), dialling meshd's TLS port at the pod network's ``.1``,
   verifying ``istiod.istio-system.svc`` against meshd's root, authenticated by the pod's
   service-account token (from meshd's standalone issuer unless the test passes one, e.g. a fake
   API server's) with ``clusterid`` = the pod's cluster. Key ECDSA P-256.
2. **istio-agent's SDS server** (``IstioAgent``): Envoy's
   ``envoy.service.secret.v3.SecretDiscoveryService`` on a Unix socket in the pod's dir, serving
   ``default`` (certificate chain + key) and ``ROOTCA`` (the mesh roots) the way the agent does:
   SotW, the requested names only, ACKs and NACKs recorded, new certificates pushed on open
   streams (``rotate()``). Messages from the ``xds-protos`` wheel (tests/interop/requirements.txt).
3. **Envoy** in the pod's namespace as uid/gid 1337 with a bootstrap in istio-agent's shape
   (``sidecar_bootstrap``): node ``sidecar~<podIP>~<pod>.<ns>~<ns>.svc.cluster.local`` with
   NAMESPACE, CLUSTER_ID, NETWORK, SERVICE_ACCOUNT, LABELS, INSTANCE_IPS, ISTIO_VERSION …
   metadata; ADS over the static ``xds-grpc`` cluster to meshd's TLS port (SNI and SAN
   ``istiod.istio-system.svc``, mesh root inline, ``authorization: Bearer <token>`` and
   ``clusterid`` initial metadata) or its plaintext port (``xds="plaintext"``); the static
   ``sds-grpc`` cluster on the agent's socket; Istio's Prometheus listener on 15090; the admin
   on a Unix socket (the test reads ``/config_dump``, ``/stats``, ``/clusters`` through it).
   Waits until Envoy's /ready says LIVE: every listener and cluster meshd sent is warm (those
   that use the workload certificate or the roots warm only once SDS delivered them; a pod that
   neither serves nor calls a mesh service asks for no secret at all).

Kubernetes objects for the pods (``pod_object``, ``service_object``, ``endpoint_slice_object``)
serve both meshd's ``--config-dir`` (``ConfigDir``) and the fake API servers (``FakeCluster.apply``).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import threading
import uuid
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc
import pytest
from cryptography import x509

from conftest import MESHD_BIN, SERVER_NAME
from envoy_helpers import (
    ISTIO_VERSION,
    START_TIMEOUT_S,
    Envoy,
    envoy_binary,
    envoy_bootstrap,
    istiod_tls,
    pipe_address,
    socket_address,
    start_envoy,
    static_cluster,
    wait_until,
)
from netns import MESHD_HOST_FOR_PODS, PROXY_GID, PROXY_UID, NetnsError, Pod

try:  # Envoy's protos, generated for Python (xds-protos wheel)
    from envoy.config.core.v3 import base_pb2 as core_pb2
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.secret.v3 import sds_pb2_grpc

    _XDS_PROTOS_ERROR = None
except ImportError as e:  # reported by the first test that needs them
    _XDS_PROTOS_ERROR = e

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
WORKLOAD_CERT = "default"
ROOT_CA = "ROOTCA"
DOMAIN = "cluster.local"


def _require_xds_protos():
    if _XDS_PROTOS_ERROR is not None:
        pytest.fail(
            f"Envoy's Python protos are missing ({_XDS_PROTOS_ERROR}): install tests/interop/requirements.txt "
            "(xds-protos) into the venv that runs pytest"
        )


# --------------------------------------------------------------------------------------------
# istio-agent: workload certificate and SDS
# --------------------------------------------------------------------------------------------


@dataclass
class SdsRequest:
    """One request Envoy sent on an SDS stream."""

    stream: int
    names: list[str]
    version_info: str
    response_nonce: str
    error: str  # a NACK's error_detail.message, "" otherwise


_SdsBase = sds_pb2_grpc.SecretDiscoveryServiceServicer if _XDS_PROTOS_ERROR is None else object


class _SdsService(_SdsBase):
    """istio-agent's SDS server: SotW StreamSecrets and FetchSecrets (Delta stays UNIMPLEMENTED,
    as in istio-agent)."""

    def __init__(self, agent: "IstioAgent"):
        self.agent = agent

    def FetchSecrets(self, request, context):  # noqa: N802
        self.agent._record(0, request)
        return self.agent._response(list(request.resource_names))

    def StreamSecrets(self, request_iterator, context):  # noqa: N802
        agent = self.agent
        stream_id = next(agent._stream_ids)
        events: queue.Queue = queue.Queue()

        def read():
            try:
                for req in request_iterator:
                    events.put(("req", req))
            except Exception:  # the stream ended (cancelled, server stopping)
                pass
            finally:
                events.put(("eof", None))

        threading.Thread(target=read, name=f"sds-read-{agent.pod.name}-{stream_id}", daemon=True).start()
        with agent._lock:
            agent._streams[stream_id] = events
        names: list[str] = []
        try:
            while context.is_active() and not agent._closed:
                try:
                    kind, req = events.get(timeout=0.2)
                except queue.Empty:
                    continue
                if kind == "eof":
                    return
                if kind == "push":
                    if names:
                        yield agent._response(names)
                    continue
                agent._record(stream_id, req)
                if req.HasField("error_detail") and req.error_detail.code != 0:
                    continue  # NACK: Envoy keeps what it had; the agent waits for a change
                if req.response_nonce and list(req.resource_names) == names:
                    continue  # ACK
                names = list(req.resource_names)
                yield agent._response(names)
        finally:
            with agent._lock:
                agent._streams.pop(stream_id, None)


class IstioAgent:
    """istio-agent's certificate and SDS duties for one pod."""

    def __init__(self, pod: Pod, *, ca_addr: tuple[str, int], root_pem: bytes, token: str, cluster_id: str,
                 server_name: str = SERVER_NAME, key_type: str = "ecdsa-p256"):
        _require_xds_protos()
        self.pod = pod
        self.ca_addr = ca_addr
        self.root_pem = root_pem
        self.cluster_id = cluster_id
        self.server_name = server_name
        self.key_type = key_type
        self.dir = pod.dir
        self.token_file = self.dir / "istio-token"
        self.token_file.write_text(token)
        os.chown(self.token_file, PROXY_UID, PROXY_GID)
        os.chmod(self.token_file, 0o600)
        self.root_file = self.dir / "istio-ca-root-cert.pem"
        self.root_file.write_bytes(root_pem)
        os.chmod(self.root_file, 0o644)
        self.cert_dir = self.dir / "certs"
        self.sds_socket = self.dir / "sds.sock"
        self.cert_chain_pem = b""
        self.key_pem = b""
        self.version = 0
        #: Every request Envoy sent (SDS), in order.
        self.requests: list[SdsRequest] = []
        self._lock = threading.Lock()
        self._streams: dict[int, queue.Queue] = {}
        self._stream_ids = itertools.count(1)
        self._closed = False
        self._server: grpc.Server | None = None
        self.cert_log = ""

    # -- certificate ---------------------------------------------------------------------------
    def fetch_certificate(self) -> None:
        """`meshd cert` inside the pod as uid 1337, as istio-agent asks meshd for a certificate."""
        meshd = self.pod.lab.proxy_binary(MESHD_BIN)
        host, port = self.ca_addr
        r = self.pod.run(
            meshd, "cert",
            "--addr", f"{host}:{port}",
            "--server-name", self.server_name,
            "--root-cert", self.root_file,
            "--token", self.token_file,
            "--cluster-id", self.cluster_id,
            "--key-type", self.key_type,
            "--out", self.cert_dir,
            as_proxy=True, timeout=60, check=False,
        )
        self.cert_log = r.stderr
        if r.returncode != 0:
            raise NetnsError(f"meshd cert in pod {self.pod.name} failed ({r.returncode}):\n{r.stderr}{r.stdout}")
        chain = (self.cert_dir / "cert-chain.pem").read_bytes()
        key = (self.cert_dir / "key.pem").read_bytes()
        with self._lock:
            self.cert_chain_pem, self.key_pem = chain, key
            self.version += 1

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_chain_pem)

    @property
    def spiffe_id(self) -> str:
        san = self.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        return uris[0] if uris else ""

    def rotate(self) -> None:
        """A new certificate from meshd, pushed to Envoy on every open SDS stream."""
        self.fetch_certificate()
        with self._lock:
            streams = list(self._streams.values())
        for q in streams:
            q.put(("push", None))

    # -- SDS -----------------------------------------------------------------------------------
    def _secret(self, name: str):
        if name == WORKLOAD_CERT:
            return secret_pb2.Secret(
                name=name,
                tls_certificate=tls_common_pb2.TlsCertificate(
                    certificate_chain=core_pb2.DataSource(inline_bytes=self.cert_chain_pem),
                    private_key=core_pb2.DataSource(inline_bytes=self.key_pem),
                ),
            )
        if name == ROOT_CA:
            return secret_pb2.Secret(
                name=name,
                validation_context=tls_common_pb2.CertificateValidationContext(
                    trusted_ca=core_pb2.DataSource(inline_bytes=self.root_pem),
                ),
            )
        return None  # istio-agent answers only the names it knows (file certs aside)

    def _response(self, names: list[str]):
        with self._lock:
            resp = discovery_pb2.DiscoveryResponse(
                version_info=str(self.version), type_url=SECRET_TYPE, nonce=uuid.uuid4().hex
            )
            for n in names:
                s = self._secret(n)
                if s is not None:
                    resp.resources.add().Pack(s)
        return resp

    def _record(self, stream: int, req) -> None:
        err = req.error_detail.message if req.HasField("error_detail") and req.error_detail.code != 0 else ""
        with self._lock:
            self.requests.append(SdsRequest(stream=stream, names=list(req.resource_names), version_info=req.version_info,
                                            response_nonce=req.response_nonce, error=err))

    def nacks(self) -> list[SdsRequest]:
        with self._lock:
            return [r for r in self.requests if r.error]

    def acked_names(self) -> set[str]:
        """Names Envoy ACKed at the current certificate version."""
        with self._lock:
            v = str(self.version)
            return {n for r in self.requests if r.response_nonce and not r.error and r.version_info == v for n in r.names}

    def start_sds(self) -> Path:
        """Serves SDS on the Unix socket Envoy's `sds-grpc` cluster names (uid 1337 may connect)."""
        self.sds_socket.unlink(missing_ok=True)  # a previous agent's, when a sidecar is restarted
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"sds-{self.pod.name}"))
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(_SdsService(self), server)
        server.add_insecure_port(f"unix:{self.sds_socket}")
        server.start()
        self._server = server
        if not self.sds_socket.exists():
            raise NetnsError(f"the SDS server of pod {self.pod.name} made no socket at {self.sds_socket}")
        os.chown(self.sds_socket, PROXY_UID, PROXY_GID)
        return self.sds_socket

    def stop(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.stop(grace=1).wait(10)
            self._server = None

    def describe(self) -> str:
        with self._lock:
            reqs = [f"  stream {r.stream}: {r.names} v={r.version_info!r} nonce={r.response_nonce[:8]!r}"
                    + (f" NACK {r.error!r}" if r.error else "") for r in self.requests[-20:]]
        return f"--- agent of {self.pod.name}: SDS requests (last 20) ---\n" + "\n".join(reqs)


# --------------------------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------------------------


def node_id(pod: Pod, proxy_type: str = "sidecar") -> str:
    """Istio's node id: `<type>~<pod IP>~<pod>.<namespace>~<namespace>.svc.cluster.local`."""
    return f"{proxy_type}~{pod.ip}~{pod.name}.{pod.namespace}~{pod.namespace}.svc.{DOMAIN}"


def _prometheus_listener() -> dict:
    """Istio's bootstrap listener on 15090: /stats/prometheus from the admin."""
    return {
        "name": "prometheus_stats",
        "address": socket_address("0.0.0.0", 15090),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "codec_type": "AUTO",
                            "stat_prefix": "stats",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "backend",
                                        "domains": ["*"],
                                        "routes": [
                                            {"match": {"prefix": "/stats/prometheus"}, "route": {"cluster": "prometheus_stats"}}
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


def sidecar_bootstrap(
    pod: Pod,
    *,
    xds_addr: tuple[str, int],
    root_pem: bytes | None,
    token: str | None,
    cluster_id: str,
    network: str,
    sds_socket: Path,
    admin_socket: Path,
    api_type: str = "GRPC",
    metadata: dict | None = None,
    proxy_type: str = "sidecar",
) -> dict:
    """A bootstrap in istio-agent's shape (see the module doc) for a sidecar, or a gateway with
    proxy_type="router". `root_pem` None: ADS over plaintext (meshd's plaintext port); else TLS
    verified against it. `token` None: no authorization metadata. `metadata` adds to or
    overrides the node metadata."""
    app = pod.labels.get("app", pod.service_account)
    md = {
        "NAMESPACE": pod.namespace,
        "CLUSTER_ID": cluster_id,
        "NETWORK": network,
        "SERVICE_ACCOUNT": pod.service_account,
        "LABELS": pod.labels,
        "INSTANCE_IPS": pod.ip,
        "ISTIO_VERSION": ISTIO_VERSION,
        "POD_NAME": pod.name,
        "WORKLOAD_NAME": app,
        "MESH_ID": DOMAIN,
        "INTERCEPTION_MODE": "REDIRECT",
        **(metadata or {}),
    }
    node = {"id": node_id(pod, proxy_type), "cluster": f"{app}.{pod.namespace}", "metadata": md}
    initial_metadata = [("clusterid", cluster_id)]
    if token is not None:
        initial_metadata.insert(0, ("authorization", f"Bearer {token}"))
    return envoy_bootstrap(
        node,
        xds_addr,
        api_type=api_type,
        xds_tls=istiod_tls(root_pem=root_pem) if root_pem is not None else None,
        initial_metadata=initial_metadata,
        admin=pipe_address(admin_socket),
        clusters=[
            static_cluster("sds-grpc", pipe_address(sds_socket), http2=True, connect_timeout="1s"),
            static_cluster("prometheus_stats", pipe_address(admin_socket)),
        ],
        listeners=[_prometheus_listener()],
    )


@dataclass
class Sidecar:
    pod: Pod
    agent: IstioAgent
    envoy: Envoy
    cluster_id: str
    network: str
    node_id: str

    def stats(self, regex: str = "") -> dict[str, int]:
        return self.envoy.stats(regex)

    def stat(self, name: str) -> int:
        """A counter or gauge by exact name; 0 when Envoy has not made it (yet)."""
        return self.envoy.stat(name) or 0

    def config_dump(self) -> dict:
        return self.envoy.config_dump()

    def stop(self):
        errors = []
        for f in (self.envoy.stop, self.agent.stop):
            try:
                f()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def describe(self) -> str:
        return f"=== proxy of {self.pod.name} ({self.node_id}) ===\n{self.envoy.describe()}\n{self.agent.describe()}"


def _pod_reachable(pod: Pod, meshd, listener: str) -> tuple[str, int]:
    host, port = meshd.addrs[listener]
    if host in (MESHD_HOST_FOR_PODS, pod.network.gateway):
        return pod.network.gateway, port
    pytest.fail(
        f"meshd's {listener} listener is on {host}, which pod {pod.name} cannot reach: start meshd with "
        f"grpc_host={MESHD_HOST_FOR_PODS!r}, plaintext_host={MESHD_HOST_FOR_PODS!r} (netns.MESHD_HOST_FOR_PODS)"
    )


def start_sidecar(
    pod: Pod,
    meshd,
    *,
    cluster_id: str = "Kubernetes",
    network: str | None = None,
    token: str | None = None,
    xds: str = "tls",
    api_type: str = "GRPC",
    metadata: dict | None = None,
    proxy_type: str = "sidecar",
    ready_timeout: float = START_TIMEOUT_S,
    discovery_addr: tuple[str, int] | None = None,
) -> Sidecar:
    """istio-agent + Envoy for `pod` against `meshd` (a conftest Meshd listening where pods reach
    it, MESHD_HOST_FOR_PODS). `network` defaults to the pod's first network's name; `token` to
    one from meshd's standalone issuer for the pod's namespace and service account; `xds` is
    "tls" (meshd's 15012-style port, token + clusterid metadata) or "plaintext". proxy_type
    "router" makes it a gateway (e.g. an east-west gateway: labels from the pod, listeners
    bound on every address of the pod, no capture needed). `discovery_addr` is where the pod
    reaches meshd's TLS port for certificates and xDS when that is not meshd's own listener (a
    remote network's pods dial the east-west gateway's LoadBalancer IP:15012). Ended by the lab's
    close()."""
    envoy_binary()  # fail early (never skip) when there is none
    network = pod.network.name if network is None else network
    if token is None:
        token = meshd.token(pod.namespace, pod.service_account)
    ca_addr = discovery_addr or _pod_reachable(pod, meshd, "grpc-tls")
    agent = IstioAgent(pod, ca_addr=ca_addr, root_pem=meshd.root_pem, token=token, cluster_id=cluster_id)
    pod.lab.on_close(agent.stop)
    agent.fetch_certificate()
    agent.start_sds()
    if xds == "tls":
        xds_addr, root, tok = ca_addr, meshd.root_pem, token
    elif xds == "plaintext":
        xds_addr, root, tok = _pod_reachable(pod, meshd, "grpc-plaintext"), None, None
    else:
        raise ValueError(f"xds must be 'tls' or 'plaintext', not {xds!r}")
    bootstrap = sidecar_bootstrap(
        pod,
        xds_addr=xds_addr,
        root_pem=root,
        token=tok,
        cluster_id=cluster_id,
        network=network,
        sds_socket=agent.sds_socket,
        admin_socket=pod.dir / "admin.sock",
        api_type=api_type,
        metadata=metadata,
        proxy_type=proxy_type,
    )
    workdir = pod.dir / "envoy"
    workdir.mkdir(exist_ok=True)
    os.chown(workdir, PROXY_UID, PROXY_GID)
    (pod.dir / "admin.sock").unlink(missing_ok=True)
    binary = pod.lab.proxy_binary(envoy_binary())
    prefix = pod.cmd(as_proxy=True)
    envoy = start_envoy(workdir, bootstrap, prefix=prefix, binary=binary)
    sc = Sidecar(pod=pod, agent=agent, envoy=envoy, cluster_id=cluster_id, network=network,
                 node_id=node_id(pod, proxy_type))
    pod.lab.on_close(envoy.stop)
    pod.sidecar = sc
    wait_until(f"the {proxy_type} proxy of {pod.name} is LIVE (its xDS config and SDS secrets in)", ready_timeout,
               envoy.ready, lambda: sc.describe() + "\n" + meshd.describe()[-4000:])
    return sc


# --------------------------------------------------------------------------------------------
# Kubernetes objects for pods (config-dir files or fake API servers)
# --------------------------------------------------------------------------------------------


def _meta(name: str, namespace: str | None, cluster: str | None, labels: dict | None = None) -> dict:
    m: dict = {"name": name}
    if namespace is not None:
        m["namespace"] = namespace
    if labels:
        m["labels"] = dict(labels)
    if cluster:
        m["annotations"] = {"meshd.io/cluster": cluster}
    return m


def pod_object(pod: Pod, *, cluster: str | None = None, network_label: bool = True) -> dict:
    """The Pod: running and ready at pod.ip, its labels plus (network_label) Istio's
    topology.istio.io/network = its first network. `cluster` annotates it for --config-dir
    (meshd.io/cluster)."""
    labels = dict(pod.labels)
    if network_label:
        labels.setdefault("topology.istio.io/network", pod.network.name)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta(pod.name, pod.namespace, cluster, labels),
        "spec": {"serviceAccountName": pod.service_account, "containers": [{"name": "app", "image": "app"}]},
        "status": {
            "phase": "Running",
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def service_object(name: str, namespace: str, cluster_ip: str, ports: Sequence[tuple[str, int, int]], *,
                   cluster: str | None = None, selector: dict | None = None) -> dict:
    """A ClusterIP Service; ports are (name, port, targetPort) — the name carries the protocol
    (http, grpc, tcp-…) as Istio reads it."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, cluster),
        "spec": {
            "clusterIP": cluster_ip,
            "selector": selector or {"app": name},
            "ports": [{"name": n, "port": p, "targetPort": t, "protocol": "TCP"} for n, p, t in ports],
        },
    }


def endpoint_slice_object(service: str, namespace: str, pods: Sequence[Pod], port: int, *, port_name: str = "http",
                          name: str | None = None, cluster: str | None = None) -> dict:
    """An EndpointSlice of `service` with every pod (its pod IP, ready) on `port` (the target
    port the app listens on; meshd finds a sidecar's inbound ports from it)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {**_meta(name or f"{service}-slice", namespace, cluster), "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [p.ip],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace},
            }
            for p in pods
        ],
    }


@dataclass
class ConfigDir:
    """meshd's --config-dir: each write() replaces one file (a JSON List) atomically."""

    path: Path
    files: dict[str, list[dict]] = field(default_factory=dict)

    def __post_init__(self):
        self.path.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, *objects: dict) -> Path:
        target = self.path / f"{name}.json"
        tmp = self.path / f".{name}.json.tmp"
        tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}, indent=1))
        tmp.replace(target)
        self.files[name] = list(objects)
        return target

    def remove(self, name: str) -> None:
        (self.path / f"{name}.json").unlink(missing_ok=True)
        self.files.pop(name, None)
