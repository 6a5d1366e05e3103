#!/usr/bin/env python3
"""Writes the committed seed corpus of every fuzz target: fuzz/corpus/<target>/seed-*.

Needs only python3 and the openssl command (for the CSRs). Run from anywhere:
    python3 fuzz/make_seeds.py
The seeds are small, real inputs in each target's input format (see the doc comment at the top of
each fuzz_targets/*.rs); libFuzzer mutates from there.
"""
import base64
import json
import os
import struct
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------
# csr: byte 0 even = PEM text, odd = DER
# ---------------------------------------------------------------------------------------------
def openssl_csr(newkey, extra):
    with tempfile.TemporaryDirectory() as t:
        out = os.path.join(t, "csr.pem")
        subprocess.run(
            ["openssl", "req", "-new", "-nodes", "-keyout", os.devnull, "-subj", "/O=meshd-fuzz"]
            + newkey + extra + ["-out", out],
            check=True, capture_output=True)
        pem = open(out, "rb").read()
        der = subprocess.run(["openssl", "req", "-in", out, "-outform", "DER"], check=True,
                             capture_output=True).stdout
        return pem, der


def csr_seeds():
    san = ["-addext", "subjectAltName=URI:spiffe://cluster.local/ns/default/sa/web"]
    pem, der = openssl_csr(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"], san)
    write("csr", "p256-pem", b"\x00" + pem)
    write("csr", "p256-der", b"\x01" + der)
    _, der = openssl_csr(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1"],
                         san + ["-addext", "basicConstraints=critical,CA:TRUE"])
    write("csr", "p384-ca-der", b"\x01" + der)
    _, der = openssl_csr(["-newkey", "rsa:2048"], san)
    write("csr", "rsa2048-der", b"\x01" + der)
    weak = open(os.path.join(HERE, "..", "tests", "fixtures", "rsa1024.csr"), "rb").read()
    write("csr", "rsa1024-pem", b"\x00" + weak)
    write("csr", "spiffe", b"\x00spiffe://cluster.local/ns/default/sa/web\n")


# ---------------------------------------------------------------------------------------------
# jwt: byte 0 = mode (0 raw token, 1 edits of a valid token, 2 header/claims signed with the
# trusted key, 3 the same signed with another key or alg none); 0xff separates header and claims
# ---------------------------------------------------------------------------------------------
def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=")


def jwt_seeds():
    now = 1_800_000_000
    header = json.dumps({"alg": "ES256", "kid": "ec1", "typ": "JWT"}).encode()
    claims = json.dumps({
        "iss": "https://issuer.example", "aud": ["aud1"], "sub": "system:serviceaccount:default:web",
        "exp": now + 3600, "iat": now, "nbf": now,
        "kubernetes.io": {"pod": {"name": "web-1", "uid": "u1"}},
    }).encode()
    write("jwt", "claims-valid", b"\x02" + header + b"\xff" + claims)
    expired = json.dumps({"iss": "https://issuer.example", "aud": "aud1",
                          "sub": "system:serviceaccount:default:web", "exp": now - 3600}).encode()
    write("jwt", "claims-expired", b"\x02" + header + b"\xff" + expired)
    write("jwt", "claims-alg-none", b"\x03" + json.dumps({"alg": "none"}).encode() + b"\xff" + claims)
    foreign = b".".join([b64u(json.dumps({"alg": "RS256", "kid": "k"}).encode()),
                         b64u(json.dumps({"iss": "meshd/standalone", "aud": ["istio-ca"],
                                          "sub": "system:serviceaccount:default:web",
                                          "exp": now + 60}).encode()),
                         b64u(b"\x00" * 256)])
    write("jwt", "raw-foreign", b"\x00" + foreign)
    write("jwt", "raw-hs256", b"\x00" + b".".join([b64u(b'{"alg":"HS256"}'), b64u(claims), b64u(b"sig")]))
    write("jwt", "edit-standalone", b"\x01\x00")
    write("jwt", "edit-rule", b"\x01\x01" + struct.pack(">H", 20) + b"A")


# ---------------------------------------------------------------------------------------------
# kubeconfig: YAML text
# ---------------------------------------------------------------------------------------------
KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: cluster2
  cluster:
    server: https://127.0.0.3:6443
    certificate-authority-data: Zm9v
contexts:
- name: cluster2
  context: {cluster: cluster2, user: cluster2}
current-context: cluster2
users:
- name: cluster2
  user:
%s
"""


def kubeconfig_seeds():
    write("kubeconfig", "token", KUBECONFIG % "    token: abc")
    write("kubeconfig", "exec", KUBECONFIG % (
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh\n"
        "      args: [-c, id]"))
    write("kubeconfig", "oidc", KUBECONFIG % "    auth-provider:\n      name: oidc\n      config: {id-token: x}")
    write("kubeconfig", "gcp", KUBECONFIG % "    auth-provider:\n      name: gcp\n      config: {cmd-path: /bin/x}")
    write("kubeconfig", "files", KUBECONFIG % (
        "    tokenFile: /var/run/secrets/token\n    client-certificate: /etc/c.pem\n    client-key: /etc/k.pem"))
    write("kubeconfig", "multidoc", (KUBECONFIG % "    token: abc") + "---\n" + (KUBECONFIG % "    exec: {command: id}")
          .replace("current-context: cluster2\n", "").replace("name: cluster2", "name: other"))


# ---------------------------------------------------------------------------------------------
# admission: AdmissionReview JSON, optionally preceded by a "/path\n" line
# ---------------------------------------------------------------------------------------------
def review(kind, group, version, resource, obj, namespace="default", op="CREATE"):
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "7f0b2c1e-0000-4000-8000-000000000001",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "operation": op, "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "namespace": namespace, "object": obj,
        },
    }, indent=1)


def admission_seeds():
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "echo-7d4b9-", "labels": {"app": "echo", "version": "v1"},
                     "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "echo-7d4b9",
                                          "uid": "u", "controller": True}]},
        "spec": {"serviceAccountName": "echo",
                 "containers": [{"name": "echo", "image": "echo:1", "ports": [{"containerPort": 8080}],
                                 "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}]},
    }
    write("admission", "pod", review("Pod", "", "v1", "pods", pod))
    write("admission", "pod-path", "/inject/cluster/cluster2/net/network2/istio_meta_dns_capture/true\n"
          + review("Pod", "", "v1", "pods", pod))
    # Not something an API server sends (Go always writes metadata), found by the fuzzer: the
    # patch then cannot apply to the object as sent; the target checks patches only on real shapes.
    bare = {k: v for k, v in pod.items() if k != "metadata"}
    write("admission", "pod-without-metadata", review("Pod", "", "v1", "pods", bare))
    host = dict(pod, spec=dict(pod["spec"], hostNetwork=True))
    write("admission", "pod-hostnetwork", review("Pod", "", "v1", "pods", host))
    gw = {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "gw"},
          "spec": {"selector": {"istio": "ingressgateway"},
                   "servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}}
    write("admission", "gateway", review("Gateway", "networking.istio.io", "v1", "gateways", gw))
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "echo"},
          "spec": {"hosts": ["echo"], "http": [{"match": [{"uri": {"prefix": "/v1"}}],
                                                "route": [{"destination": {"host": "echo", "subset": "v1"},
                                                           "weight": 80}]}]}}
    write("admission", "virtualservice", review("VirtualService", "networking.istio.io", "v1",
                                                "virtualservices", vs))
    dr = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "echo"},
          "spec": {"host": "echo", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}}
    write("admission", "destinationrule", review("DestinationRule", "networking.istio.io", "v1",
                                                 "destinationrules", dr, op="UPDATE"))


# ---------------------------------------------------------------------------------------------
# xds_requests: byte 0 flags (bit 0 delta, bit 1 authenticated), then [op, len16, payload] ops
# ---------------------------------------------------------------------------------------------
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(tag, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(tag << 3 | 2) + varint(len(payload)) + payload


def struct_pb(md):
    # google.protobuf.Struct{fields=1: map<string, Value{string_value=3 | struct_value=5}>}
    out = b""
    for k, v in md.items():
        val = field(5, struct_pb(v)) if isinstance(v, dict) else field(3, v)
        out += field(1, field(1, k) + field(2, val))
    return out


def node(node_id, md):
    return field(1, node_id) + field(3, struct_pb(md))


SIDECAR = node("sidecar~127.0.0.10~echo-v1-7d4b9.default~default.svc.cluster.local",
               {"CLUSTER_ID": "cluster1", "NAMESPACE": "default", "SERVICE_ACCOUNT": "echo",
                "LABELS": {"app": "echo", "version": "v1"}})
GATEWAY = node("router~127.0.0.30~gw-1.istio-system~istio-system.svc.cluster.local",
               {"CLUSTER_ID": "cluster1", "NAMESPACE": "istio-system", "LABELS": {"istio": "ingressgateway"}})
GRPC = node("sidecar~127.0.0.40~client.default~default.svc.cluster.local",
            {"CLUSTER_ID": "cluster1", "NAMESPACE": "default", "GENERATOR": "grpc"})

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SDS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
ECHO_80 = "outbound|80||echo.default.svc.cluster.local"


def sotw(type_url, names=(), nd=None, error=None):
    # DiscoveryRequest{version_info=1, node=2, resource_names=3, type_url=4, response_nonce=5, error_detail=6}
    out = b""
    if nd:
        out += field(2, nd)
    for n in names:
        out += field(3, n)
    out += field(4, type_url)
    if error:
        out += field(6, varint(1 << 3 | 0) + varint(3) + field(2, error))  # google.rpc.Status{code=1, message=2}
    return out


def delta(type_url, sub=(), unsub=(), nd=None, initial=None, error=None):
    # DeltaDiscoveryRequest{node=1, type_url=2, subscribe=3, unsubscribe=4, initial_resource_versions=5,
    # response_nonce=6, error_detail=7}
    out = b""
    if nd:
        out += field(1, nd)
    out += field(2, type_url)
    for n in sub:
        out += field(3, n)
    for n in unsub:
        out += field(4, n)
    for k, v in (initial or {}).items():
        out += field(5, field(1, k) + field(2, v))
    if error:
        out += field(7, varint(1 << 3 | 0) + varint(3) + field(2, error))
    return out


def op(code, payload=b""):
    return bytes([code]) + struct.pack(">H", len(payload)) + payload


def xds_seeds():
    # Envoy sidecar, SotW, plaintext: CDS, EDS, LDS, RDS with ACKs, pushes, a NACK.
    write("xds_requests", "sotw-sidecar", b"\x00" + b"".join([
        op(0, sotw(CDS, nd=SIDECAR)), op(1, sotw(CDS)),
        op(0, sotw(EDS, [ECHO_80])), op(1, sotw(EDS, [ECHO_80])),
        op(0, sotw(LDS)), op(1, sotw(LDS)),
        op(0, sotw(RDS, ["80"])), op(1, sotw(RDS, ["80"])),
        op(5, b"\x01"), op(1, sotw(EDS, [ECHO_80])),
        op(4, b"\x01"), op(1, sotw(CDS, error="bad cluster")), op(2, sotw(CDS)),
        op(0, sotw(SDS, ["default"])),
        op(6, b"nope.default.svc.cluster.local"),
    ]))
    # Authenticated (default/echo) SotW with secrets asked for.
    write("xds_requests", "sotw-secure", b"\x02" + b"".join([
        op(0, sotw(CDS, nd=SIDECAR)), op(1, sotw(CDS)), op(0, sotw(SDS, ["default", "ROOTCA"])),
        op(1, sotw(SDS, ["default", "ROOTCA"])),
    ]))
    # Authenticated stream of a gateway in another namespace: refused.
    write("xds_requests", "sotw-secure-denied", b"\x02" + op(0, sotw(LDS, nd=GATEWAY)))
    # A gateway over plaintext: LDS, RDS.
    write("xds_requests", "sotw-gateway", b"\x00" + b"".join([
        op(0, sotw(CDS, nd=GATEWAY)), op(1, sotw(CDS)), op(0, sotw(LDS)), op(1, sotw(LDS)),
        op(0, sotw(RDS, ["http.8080"])), op(1, sotw(RDS, ["http.8080"])), op(4, b"\x00"),
    ]))
    # Proxyless gRPC: names asked for one by one.
    write("xds_requests", "sotw-grpc", b"\x00" + b"".join([
        op(0, sotw(LDS, ["echo.default.svc.cluster.local:80"], nd=GRPC)),
        op(1, sotw(LDS, ["echo.default.svc.cluster.local:80"])),
        op(0, sotw(RDS, ["echo.default.svc.cluster.local:80"])), op(0, sotw(CDS, [ECHO_80])),
        op(0, sotw(EDS, [ECHO_80])), op(1, sotw(EDS, [ECHO_80])), op(5, b"\x00"),
    ]))
    # Delta: wildcard CDS, EDS subscribe, ACKs, unsubscribe, pushes.
    write("xds_requests", "delta-sidecar", b"\x01" + b"".join([
        op(0, delta(CDS, ["*"], nd=SIDECAR)), op(1, delta(CDS)),
        op(0, delta(EDS, [ECHO_80])), op(1, delta(EDS)),
        op(0, delta(LDS)), op(1, delta(LDS)), op(0, delta(RDS, ["80"])),
        op(5, b"\x02"), op(1, delta(EDS)), op(4, b"\x01"), op(1, delta(CDS)),
        op(0, delta(EDS, unsub=[ECHO_80])), op(1, delta(CDS, error="nack")),
    ]))
    # Delta reconnect with initial_resource_versions, authenticated.
    write("xds_requests", "delta-reconnect", b"\x03" + b"".join([
        op(0, delta(CDS, nd=SIDECAR, initial={ECHO_80: "old", "outbound|9||gone": "x"})),
        op(1, delta(CDS)), op(0, delta(EDS, [ECHO_80], initial={ECHO_80: "v"})), op(2, delta(EDS)),
    ]))
    # Malformed bytes after a good first request.
    write("xds_requests", "sotw-raw", b"\x00" + op(0, sotw(CDS, nd=SIDECAR)) + op(3, b"\x0a\xff\xff"))


if __name__ == "__main__":
    csr_seeds()
    jwt_seeds()
    kubeconfig_seeds()
    admission_seeds()
    xds_seeds()
    for t in sorted(os.listdir(CORPUS)):
        print(t, len(os.listdir(os.path.join(CORPUS, t))), "seeds")
