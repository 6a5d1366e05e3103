"""meshd's CA seen by an independent client: grpcio for the calls, `cryptography` for the keys,
the CSRs and every check on what comes back. Nothing here shares code with meshd."""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import ssl
import time

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import struct_pb2

TRUST_DOMAIN = "cluster.local"
BACKDATE_S = 120
DEFAULT_TTL_S = 24 * 3600
MAX_TTL_S = 90 * 86400  # 7776000
RPC_TIMEOUT_S = 30
#: The name clients verify the TLS port against, and the serving certificate's DNS SANs.
SERVER_NAME = "istiod.istio-system.svc"
ISTIOD_DNS_SANS = ["istiod.istio-system.svc", "istiod-remote.istio-system.svc", "istio-pilot.istio-system.svc"]
#: Seconds of slack for clock reads on both sides and second-granular certificate times.
TIME_SLACK_S = 5


def spiffe(ns: str, sa: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}"


# --------------------------------------------------------------------------------------------
# Client side: keys, CSRs, the call
# --------------------------------------------------------------------------------------------


def new_key(kind: str):
    if kind == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ecdsa-p521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa-1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    raise ValueError(kind)


def make_csr(key, uri: str | None = None, subject_cn: str | None = None, ask_ca: bool = False) -> str:
    """A PEM PKCS#10 CSR as istio-agent builds it: empty subject, the SPIFFE URI as SAN."""
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)] if subject_cn else []
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if uri:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                            critical=False)
    if ask_ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def create_certificate(stubs, channel, csr: str, token: str | None = None, validity: int = 0,
                       metadata: dict | None = None, cluster_id: str | None = "Kubernetes",
                       auth_header: str | None = None):
    md = []
    if auth_header is not None:
        md.append(("authorization", auth_header))
    elif token is not None:
        md.append(("authorization", f"Bearer {token}"))
    if cluster_id is not None:
        md.append(("clusterid", cluster_id))
    req = stubs.pb2.IstioCertificateRequest(csr=csr, validity_duration=validity)
    if metadata is not None:
        s = struct_pb2.Struct()
        s.update(metadata)
        req.metadata.CopyFrom(s)
    stub = stubs.grpc.IstioCertificateServiceStub(channel)
    return stub.CreateCertificate(req, metadata=md, timeout=RPC_TIMEOUT_S)


def expect_rpc_error(fn, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    assert ei.value.code() == code, f"expected {code}, got {ei.value.code()}: {ei.value.details()}"
    return ei.value


# --------------------------------------------------------------------------------------------
# Checks on the answer
# --------------------------------------------------------------------------------------------


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Verifies cert's signature with issuer's public key (raises InvalidSignature)."""
    pub = issuer.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    elif isinstance(pub, rsa.RSAPublicKey):
        pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                   cert.signature_hash_algorithm)
    else:
        raise AssertionError(f"unexpected root key type {type(pub).__name__}")


def check_workload_chain(meshd, chain, key, expected_uri: str, ttl_s: int,
                         t_before: float, t_after: float) -> x509.Certificate:
    """Everything istiod's template promises about [leaf, root]; returns the leaf."""
    chain = list(chain)
    assert len(chain) == 2, f"self-signed CA answers [leaf, root]; got {len(chain)} entries"
    leaf_certs = x509.load_pem_x509_certificates(chain[0].encode())
    assert len(leaf_certs) == 1, "the first entry is exactly one certificate"
    leaf = leaf_certs[0]

    roots_in_answer = x509.load_pem_x509_certificates(chain[1].encode())
    roots_on_disk = x509.load_pem_x509_certificates(meshd.root_pem)
    assert [r.public_bytes(serialization.Encoding.DER) for r in roots_in_answer] == \
        [r.public_bytes(serialization.Encoding.DER) for r in roots_on_disk], \
        "the last entry is the root bundle of <data-dir>/root-cert.pem"
    root = roots_in_answer[0]
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True

    # Signed by the root: checked by hand with the root's public key, and by cryptography.
    assert leaf.issuer == root.subject
    verify_signed_by(leaf, root)
    leaf.verify_directly_issued_by(root)
    # The same check must fail against an unrelated key.
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(InvalidSignature):
        other.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))

    assert leaf.version == x509.Version.v3
    assert spki(leaf.public_key()) == spki(key.public_key()), "leaf carries the CSR's public key"
    assert leaf.serial_number > 0 and leaf.serial_number.bit_length() > 100, "random ~128-bit serial"

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical is True, "SAN is critical (the subject is empty)"
    assert list(san.value) == [x509.UniformResourceIdentifier(expected_uri)], \
        f"the only SAN is the caller's identity; got {list(san.value)}"
    assert len(leaf.subject) == 0 and leaf.subject.rdns == [], f"empty subject; got {leaf.subject}"

    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.value.ca is False, "a workload certificate is never a CA"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature is True and ku.key_cert_sign is False and ku.crl_sign is False

    nb = leaf.not_valid_before_utc.timestamp()
    na = leaf.not_valid_after_utc.timestamp()
    assert t_before - BACKDATE_S - TIME_SLACK_S <= nb <= t_after - BACKDATE_S + TIME_SLACK_S, \
        f"NotBefore {leaf.not_valid_before_utc} is not now-2m (call at {dt.datetime.fromtimestamp(t_before, dt.UTC)})"
    assert t_before + ttl_s - TIME_SLACK_S <= na <= t_after + ttl_s + TIME_SLACK_S, \
        f"NotAfter {leaf.not_valid_after_utc} is not now+{ttl_s}s"
    assert abs((na - nb) - (ttl_s + BACKDATE_S)) <= 1, f"lifetime {na - nb}s != {ttl_s}s + 2m backdate"
    return leaf


def issue(stubs, meshd, key_kind: str, ns: str, sa: str, validity: int = 0, csr_uri: str | None = "auto",
          **csr_kw):
    key = new_key(key_kind)
    uri = spiffe(ns, sa) if csr_uri == "auto" else csr_uri
    csr = make_csr(key, uri, **csr_kw)
    token = meshd.token(ns, sa)
    t_before = time.time()
    resp = create_certificate(stubs, meshd.tls_channel(), csr, token, validity=validity)
    t_after = time.time()
    return key, resp, t_before, t_after


# --------------------------------------------------------------------------------------------
# Issuance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_kind", ["ecdsa-p256", "rsa-2048", "ecdsa-p384"])
def test_issues_istio_template_leaf(ca_stubs, meshd_by_root, key_kind):
    ns, sa = "interop", f"client-{key_kind}"
    key, resp, t0, t1 = issue(ca_stubs, meshd_by_root, key_kind, ns, sa)
    check_workload_chain(meshd_by_root, resp.cert_chain, key, spiffe(ns, sa), DEFAULT_TTL_S, t0, t1)


def test_identity_comes_from_the_token_not_the_csr(ca_stubs, shared_meshd):
    """A CSR asking for another identity, a subject and CA:true still gets a plain leaf for the
    token's service account."""
    ns, sa = "payments", "api"
    key, resp, t0, t1 = issue(ca_stubs, shared_meshd, "ecdsa-p256", ns, sa,
                              csr_uri="spiffe://evil.example/ns/kube-system/sa/admin",
                              subject_cn="admin", ask_ca=True)
    check_workload_chain(shared_meshd, resp.cert_chain, key, spiffe(ns, sa), DEFAULT_TTL_S, t0, t1)


def test_csr_without_san_is_signed_for_the_token_identity(ca_stubs, shared_meshd):
    ns, sa = "nosan", "worker"
    key, resp, t0, t1 = issue(ca_stubs, shared_meshd, "rsa-2048", ns, sa, csr_uri=None)
    check_workload_chain(shared_meshd, resp.cert_chain, key, spiffe(ns, sa), DEFAULT_TTL_S, t0, t1)


@pytest.mark.parametrize("validity", [3600, MAX_TTL_S], ids=["1h", "90d-exactly"])
def test_requested_validity_is_honoured_up_to_the_max(ca_stubs, shared_meshd, validity):
    ns, sa = "ttl", f"v{validity}"
    key, resp, t0, t1 = issue(ca_stubs, shared_meshd, "ecdsa-p256", ns, sa, validity=validity)
    check_workload_chain(shared_meshd, resp.cert_chain, key, spiffe(ns, sa), validity, t0, t1)


def test_negative_validity_means_default(ca_stubs, shared_meshd):
    ns, sa = "ttl", "negative"
    key, resp, t0, t1 = issue(ca_stubs, shared_meshd, "ecdsa-p256", ns, sa, validity=-5)
    check_workload_chain(shared_meshd, resp.cert_chain, key, spiffe(ns, sa), DEFAULT_TTL_S, t0, t1)


def test_unrelated_metadata_is_accepted(ca_stubs, shared_meshd):
    key = new_key("ecdsa-p256")
    tok = shared_meshd.token("meta", "sa")
    t0 = time.time()
    resp = create_certificate(ca_stubs, shared_meshd.tls_channel(), make_csr(key, spiffe("meta", "sa")), tok,
                              metadata={"note": "hello", "n": 3})
    t1 = time.time()
    check_workload_chain(shared_meshd, resp.cert_chain, key, spiffe("meta", "sa"), DEFAULT_TTL_S, t0, t1)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def test_validity_over_90_days_is_invalid_argument(ca_stubs, shared_meshd):
    key = new_key("ecdsa-p256")
    tok = shared_meshd.token("ttl", "toolong")
    err = expect_rpc_error(
        lambda: create_certificate(ca_stubs, shared_meshd.tls_channel(), make_csr(key, spiffe("ttl", "toolong")),
                                   tok, validity=MAX_TTL_S + 1),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert "7776001" in err.details(), err.details()


def test_no_token_is_unauthenticated(ca_stubs, shared_meshd):
    key = new_key("ecdsa-p256")
    expect_rpc_error(
        lambda: create_certificate(ca_stubs, shared_meshd.tls_channel(), make_csr(key, spiffe("a", "b")), None),
        grpc.StatusCode.UNAUTHENTICATED)


@pytest.mark.parametrize("case", ["garbage", "not-bearer", "wrong-audience", "foreign-issuer", "tampered"])
def test_bad_tokens_are_unauthenticated(ca_stubs, shared_meshd, tmp_path, case):
    key = new_key("ecdsa-p256")
    good = shared_meshd.token("a", "b")
    header = f"Bearer {good}"
    if case == "garbage":
        header = "Bearer not.a.jwt"
    elif case == "not-bearer":
        header = f"Basic {good}"
    elif case == "wrong-audience":
        header = f"Bearer {shared_meshd.token('a', 'b', audience='kubernetes.default.svc')}"
    elif case == "foreign-issuer":
        header = f"Bearer {shared_meshd.token('a', 'b', data_dir=tmp_path / 'other-data-dir')}"
    elif case == "tampered":
        h, p, s = good.split(".")
        header = f"Bearer {h}.{p[:-4] + ('AAAA' if p[-4:] != 'AAAA' else 'BBBB')}.{s}"
    expect_rpc_error(
        lambda: create_certificate(ca_stubs, shared_meshd.tls_channel(), make_csr(key, spiffe("a", "b")),
                                   auth_header=header),
        grpc.StatusCode.UNAUTHENTICATED)


def test_impersonation_request_is_unauthenticated(ca_stubs, shared_meshd):
    key = new_key("ecdsa-p256")
    tok = shared_meshd.token("ztunnel", "ztunnel")
    expect_rpc_error(
        lambda: create_certificate(ca_stubs, shared_meshd.tls_channel(), make_csr(key), tok,
                                   metadata={"ImpersonatedIdentity": spiffe("default", "victim")}),
        grpc.StatusCode.UNAUTHENTICATED)


@pytest.mark.parametrize("csr_kind", ["junk", "empty", "certificate-not-csr", "rsa-1024", "ecdsa-p521", "ed25519"])
def test_bad_csr_is_invalid_argument(ca_stubs, shared_meshd, csr_kind):
    """Only RSA >= 2048 and ECDSA P-256/P-384 keys in a well-formed CSR are signed."""
    tok = shared_meshd.token("a", "b")
    if csr_kind == "junk":
        csr = "-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8=\n-----END CERTIFICATE REQUEST-----\n"
    elif csr_kind == "empty":
        csr = ""
    elif csr_kind == "certificate-not-csr":
        csr = shared_meshd.root_pem.decode()
    else:
        csr = make_csr(new_key(csr_kind), spiffe("a", "b"))
    expect_rpc_error(lambda: create_certificate(ca_stubs, shared_meshd.tls_channel(), csr, tok),
                     grpc.StatusCode.INVALID_ARGUMENT)


def test_plaintext_port_refuses_even_a_valid_token(ca_stubs, shared_meshd):
    key = new_key("ecdsa-p256")
    tok = shared_meshd.token("a", "b")
    csr = make_csr(key, spiffe("a", "b"))
    expect_rpc_error(lambda: create_certificate(ca_stubs, shared_meshd.plaintext_channel(), csr, tok),
                     grpc.StatusCode.UNAUTHENTICATED)
    # The same request is fine on the TLS port, so the refusal is about the port.
    resp = create_certificate(ca_stubs, shared_meshd.tls_channel(), csr, tok)
    assert len(resp.cert_chain) == 2


# --------------------------------------------------------------------------------------------
# Renewal over mTLS, and tokens made by hand (signed here with the data dir's issuer key)
# --------------------------------------------------------------------------------------------


def test_workload_renews_with_its_certificate_over_mtls(ca_stubs, shared_meshd):
    """istio-agent renews with the certificate it holds: no token, the TLS client certificate
    is the credential."""
    ns, sa = "renew", "agent"
    key, resp, _, _ = issue(ca_stubs, shared_meshd, "ecdsa-p256", ns, sa)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    creds = grpc.ssl_channel_credentials(root_certificates=shared_meshd.root_pem, private_key=key_pem,
                                         certificate_chain=resp.cert_chain[0].encode())
    with grpc.secure_channel(shared_meshd.tls_target, creds,
                             options=[("grpc.ssl_target_name_override", SERVER_NAME),
                                      ("grpc.enable_http_proxy", 0),
                                      ("grpc.use_local_subchannel_pool", 1)]) as ch:
        key2 = new_key("rsa-2048")
        t0 = time.time()
        resp2 = create_certificate(ca_stubs, ch, make_csr(key2, spiffe(ns, sa)), None)
        t1 = time.time()
    check_workload_chain(shared_meshd, resp2.cert_chain, key2, spiffe(ns, sa), DEFAULT_TTL_S, t0, t1)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made_token(data_dir, sub: str, *, exp_in: int | None = 600, nbf_in: int = 0,
                    aud=("istio-ca",), alg: str = "RS256") -> str:
    """A JWT shaped like `meshd token`'s, signed here with <data-dir>/issuer/key.pem."""
    kid = json.loads((data_dir / "issuer" / "jwks.json").read_text())["keys"][0]["kid"]
    now = int(time.time())
    claims = {"iss": "meshd/standalone", "aud": list(aud), "sub": sub, "iat": now, "nbf": now + nbf_in,
              "jti": b64url(b"interop-test")}
    if exp_in is not None:
        claims["exp"] = now + exp_in
    header = {"alg": alg, "typ": "JWT", "kid": kid}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if alg == "none":
        return signing_input + "."
    key = serialization.load_pem_private_key((data_dir / "issuer" / "key.pem").read_bytes(), password=None)
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(sig)}"


def test_hand_made_token_is_accepted(ca_stubs, shared_meshd):
    """Positive control for the hand-made tokens below: same key and claims → a certificate."""
    key = new_key("ecdsa-p256")
    tok = hand_made_token(shared_meshd.data_dir, "system:serviceaccount:handmade:sa")
    t0 = time.time()
    resp = create_certificate(ca_stubs, shared_meshd.tls_channel(), make_csr(key), tok)
    t1 = time.time()
    check_workload_chain(shared_meshd, resp.cert_chain, key, spiffe("handmade", "sa"), DEFAULT_TTL_S, t0, t1)


@pytest.mark.parametrize("case", ["expired-2m-ago", "not-yet-valid-5m", "no-exp", "alg-none", "not-a-service-account"])
def test_hand_made_bad_tokens_are_unauthenticated(ca_stubs, shared_meshd, case):
    sub = "system:serviceaccount:handmade:sa"
    kw = {}
    if case == "expired-2m-ago":
        kw = {"exp_in": -120}
    elif case == "not-yet-valid-5m":
        kw = {"nbf_in": 300}
    elif case == "no-exp":
        kw = {"exp_in": None}
    elif case == "alg-none":
        kw = {"alg": "none"}
    elif case == "not-a-service-account":
        sub = "system:node:worker-1"
    tok = hand_made_token(shared_meshd.data_dir, sub, **kw)
    expect_rpc_error(
        lambda: create_certificate(ca_stubs, shared_meshd.tls_channel(), make_csr(new_key("ecdsa-p256")), tok),
        grpc.StatusCode.UNAUTHENTICATED)


# A SPIFFE id built from such names would be ambiguous or not a URI at all.
@pytest.mark.parametrize("ns,sa", [("x/sa/admin", "y"), ("A B", "c")], ids=["slash", "space"])
def test_identity_that_is_no_kubernetes_name_is_refused(ca_stubs, shared_meshd, ns, sa):
    tok = hand_made_token(shared_meshd.data_dir, f"system:serviceaccount:{ns}:{sa}")
    expect_rpc_error(
        lambda: create_certificate(ca_stubs, shared_meshd.tls_channel(), make_csr(new_key("ecdsa-p256")), tok),
        grpc.StatusCode.UNAUTHENTICATED)


# --------------------------------------------------------------------------------------------
# The serving certificate: names and IP SANs
# --------------------------------------------------------------------------------------------


def serving_cert(host: str, port: int, root_path, server_hostname: str) -> x509.Certificate:
    """The TLS port's certificate, fetched with Python's own ssl (OpenSSL) verification."""
    ctx = ssl.create_default_context(cafile=str(root_path))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname=server_hostname) as tls:
            assert tls.selected_alpn_protocol() == "h2"
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_serving_certificate_names(shared_meshd):
    host, port = shared_meshd.addrs["grpc-tls"]
    cert = serving_cert(host, port, shared_meshd.root_cert_path, SERVER_NAME)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(ISTIOD_DNS_SANS)
    assert san.get_values_for_type(x509.IPAddress) == []
    root = x509.load_pem_x509_certificates(shared_meshd.root_pem)[0]
    verify_signed_by(cert, root)
    # Without an IP SAN, verifying against the IP must fail.
    with pytest.raises(ssl.SSLCertVerificationError):
        serving_cert(host, port, shared_meshd.root_cert_path, host)


def test_ca_over_tls_verified_against_ip_san(ca_stubs, meshd_on_127_0_0_2):
    m = meshd_on_127_0_0_2
    host, port = m.addrs["grpc-tls"]
    assert host == "127.0.0.2"
    cert = serving_cert(host, port, m.root_cert_path, "127.0.0.2")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(ISTIOD_DNS_SANS)
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.2"]

    # grpcio with no name override checks the certificate against the target IP itself.
    key = new_key("ecdsa-p256")
    tok = m.token("lb", "client")
    t0 = time.time()
    resp = create_certificate(ca_stubs, m.tls_channel(server_name=None, target=f"127.0.0.2:{port}"),
                              make_csr(key, spiffe("lb", "client")), tok)
    t1 = time.time()
    check_workload_chain(m, resp.cert_chain, key, spiffe("lb", "client"), DEFAULT_TTL_S, t0, t1)


def test_tls_name_mismatch_is_refused_by_the_client(ca_stubs, shared_meshd, meshd_on_127_0_0_2):
    """The client really verifies: a name the certificate lacks, or a foreign root, fails."""
    key = new_key("ecdsa-p256")
    tok = shared_meshd.token("a", "b")
    csr = make_csr(key, spiffe("a", "b"))
    # 127.0.0.1 is no SAN of a default server's certificate.
    expect_rpc_error(
        lambda: create_certificate(ca_stubs, shared_meshd.tls_channel(server_name=None), csr, tok),
        grpc.StatusCode.UNAVAILABLE)
    expect_rpc_error(
        lambda: create_certificate(ca_stubs, shared_meshd.tls_channel(server_name="istiod.other-ns.svc"), csr, tok),
        grpc.StatusCode.UNAVAILABLE)
    # Another meshd's root does not vouch for this one.
    expect_rpc_error(
        lambda: create_certificate(ca_stubs, shared_meshd.tls_channel(root_pem=meshd_on_127_0_0_2.root_pem), csr,
                                   tok),
        grpc.StatusCode.UNAVAILABLE)


# --------------------------------------------------------------------------------------------
# Metrics after known traffic
# --------------------------------------------------------------------------------------------

CSR_COUNT = "citadel_server_csr_count"
SUCCESS = "citadel_server_success_cert_issuance_count"
AUTH_FAIL = "citadel_server_authentication_failure_count"
TTL_ERR = 'citadel_server_csr_sign_err_count{error="TTL_ERROR"}'
CSR_ERR = 'citadel_server_csr_sign_err_count{error="CSR_ERROR"}'


def test_ready_endpoints(meshd):
    # Listeners are logged when bound; readiness follows once every server runs.
    deadline = time.monotonic() + 10
    while meshd.http_get("ready", "/ready")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert meshd.http_get("ready", "/ready") == (200, "ready\n")
    assert meshd.http_get("monitoring", "/ready") == (200, "ready\n")
    status, _ = meshd.http_get("ready", "/metrics")
    assert status == 404, "the ready port serves /ready only"


def test_metrics_count_exactly_the_traffic(ca_stubs, meshd):
    before = meshd.metrics()
    assert (before.get(CSR_COUNT), before.get(SUCCESS), before.get(AUTH_FAIL)) == (0, 0, 0), before
    text = meshd.metrics_text()
    for name in (CSR_COUNT, SUCCESS, AUTH_FAIL):
        assert f"# TYPE {name} counter" in text
        assert f"{name}_total" not in text, "istio's names have no _total suffix"

    tls = meshd.tls_channel()
    tok = meshd.token("metrics", "sa")

    def csr():
        return make_csr(new_key("ecdsa-p256"), spiffe("metrics", "sa"))

    for _ in range(3):  # 3 successes
        assert len(create_certificate(ca_stubs, tls, csr(), tok).cert_chain) == 2
    # 2 authentication failures on the TLS port: no token, a garbage token.
    expect_rpc_error(lambda: create_certificate(ca_stubs, tls, csr(), None), grpc.StatusCode.UNAUTHENTICATED)
    expect_rpc_error(lambda: create_certificate(ca_stubs, tls, csr(), "x.y.z"), grpc.StatusCode.UNAUTHENTICATED)
    # 1 refusal on the plaintext port (counted as a CSR and an authentication failure).
    expect_rpc_error(lambda: create_certificate(ca_stubs, meshd.plaintext_channel(), csr(), tok),
                     grpc.StatusCode.UNAUTHENTICATED)
    # 1 authenticated request refused for its TTL: counted as a CSR, not as an auth failure.
    expect_rpc_error(lambda: create_certificate(ca_stubs, tls, csr(), tok, validity=MAX_TTL_S + 1),
                     grpc.StatusCode.INVALID_ARGUMENT)
    # 1 authenticated request with a CSR that is no CSR.
    expect_rpc_error(lambda: create_certificate(ca_stubs, tls, "not a csr", tok), grpc.StatusCode.INVALID_ARGUMENT)

    want = {CSR_COUNT: 8.0, SUCCESS: 3.0, AUTH_FAIL: 3.0, TTL_ERR: 1.0, CSR_ERR: 1.0}
    deadline = time.monotonic() + 10
    while True:
        got = meshd.metrics()
        got = {k: got.get(k) for k in want}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert got == want
