"""Method resolution the way ghz and grpcurl do it (server reflection, no proto files) and gRPC
health, on both gRPC ports."""

from __future__ import annotations

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography import x509
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

CA_SERVICE = "istio.v1.auth.IstioCertificateService"
HEALTH_SERVICE = "grpc.health.v1.Health"
RPC_TIMEOUT_S = 30
PORTS = ["plaintext", "tls"]


def channel(meshd, port: str) -> grpc.Channel:
    return meshd.plaintext_channel() if port == "plaintext" else meshd.tls_channel()


def is_repeated(f: FieldDescriptor) -> bool:
    rep = getattr(f, "is_repeated", None)
    if rep is not None:
        return rep() if callable(rep) else bool(rep)
    return f.label == FieldDescriptor.LABEL_REPEATED


# --------------------------------------------------------------------------------------------
# Descriptor resolution through reflection (grpcio-reflection's database, as ghz resolves)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", PORTS)
def test_descriptor_pool_resolves_create_certificate(shared_meshd, port):
    db = ProtoReflectionDescriptorDatabase(channel(shared_meshd, port))
    pool = descriptor_pool.DescriptorPool(db)

    svc = pool.FindServiceByName(CA_SERVICE)
    assert svc.full_name == CA_SERVICE
    assert [m.name for m in svc.methods] == ["CreateCertificate"]
    method = svc.methods_by_name["CreateCertificate"]
    assert method.full_name == f"{CA_SERVICE}.CreateCertificate"
    assert not method.client_streaming and not method.server_streaming

    req = method.input_type
    assert req.full_name == "istio.v1.auth.IstioCertificateRequest"
    fields = {f.name: f for f in req.fields}
    assert set(fields) == {"csr", "validity_duration", "metadata"}
    assert (fields["csr"].number, fields["csr"].type) == (1, FieldDescriptor.TYPE_STRING)
    assert (fields["validity_duration"].number, fields["validity_duration"].type) == (3, FieldDescriptor.TYPE_INT64)
    assert (fields["metadata"].number, fields["metadata"].type) == (4, FieldDescriptor.TYPE_MESSAGE)
    assert fields["metadata"].message_type.full_name == "google.protobuf.Struct"
    # Struct resolved through reflection too (its file came from the server).
    assert "fields" in fields["metadata"].message_type.fields_by_name

    resp = method.output_type
    assert resp.full_name == "istio.v1.auth.IstioCertificateResponse"
    chain = resp.fields_by_name["cert_chain"]
    assert [f.name for f in resp.fields] == ["cert_chain"]
    assert chain.number == 1 and chain.type == FieldDescriptor.TYPE_STRING and is_repeated(chain)

    # The file as served keeps the wire contract's package.
    assert svc.file.name == "istio/v1/auth/ca.proto"
    assert svc.file.package == "istio.v1.auth"
    assert "google/protobuf/struct.proto" in [d.name for d in svc.file.dependencies]


@pytest.mark.parametrize("port", PORTS)
def test_reflection_database_lists_services(shared_meshd, port):
    services = ProtoReflectionDescriptorDatabase(channel(shared_meshd, port)).get_services()
    assert CA_SERVICE in services and HEALTH_SERVICE in services, services


def _list_services(ch: grpc.Channel, version: str) -> list[str]:
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    if version == "v1alpha":
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = list(stub.ServerReflectionInfo(iter([req]), timeout=RPC_TIMEOUT_S))
    else:
        # grpc.reflection.v1 is wire-identical to v1alpha; only the service path differs
        # (ghz and grpcurl try v1 first).
        call = ch.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        responses = list(call(iter([req]), timeout=RPC_TIMEOUT_S))
    assert len(responses) == 1
    r = responses[0]
    assert r.WhichOneof("message_response") == "list_services_response", r
    return [s.name for s in r.list_services_response.service]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
@pytest.mark.parametrize("port", PORTS)
def test_reflection_stub_lists_services(shared_meshd, port, version):
    names = _list_services(channel(shared_meshd, port), version)
    assert HEALTH_SERVICE in names, names
    assert CA_SERVICE in names, names
    assert len(names) == len(set(names)), f"duplicate service names: {names}"


@pytest.mark.parametrize("port", PORTS)
def test_reflection_reports_unknown_symbols(shared_meshd, port):
    db = ProtoReflectionDescriptorDatabase(channel(shared_meshd, port))
    pool = descriptor_pool.DescriptorPool(db)
    # The reflection spec answers an unknown symbol with an ErrorResponse on the stream
    # (grpcio-reflection turns it into KeyError); tonic-reflection 0.14 instead ends the stream
    # with status NOT_FOUND. Either way the client must learn "not found", not get a descriptor.
    with pytest.raises((KeyError, grpc.RpcError)) as ei:
        pool.FindServiceByName("istio.v1.auth.NoSuchService")
    if isinstance(ei.value, grpc.RpcError):
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND, ei.value.details()
    # The pool is still usable for known names afterwards (one stream per request).
    assert pool.FindServiceByName(CA_SERVICE).full_name == CA_SERVICE


# --------------------------------------------------------------------------------------------
# Calling through reflected descriptors only (what ghz does with no --proto)
# --------------------------------------------------------------------------------------------


def _reflected_call(ch: grpc.Channel):
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
    method = pool.FindServiceByName(CA_SERVICE).methods_by_name["CreateCertificate"]
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    call = ch.unary_unary(
        f"/{CA_SERVICE}/CreateCertificate",
        request_serializer=req_cls.SerializeToString,
        response_deserializer=resp_cls.FromString,
    )
    return req_cls, call


def _csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


def test_reflected_create_certificate_over_tls_issues(shared_meshd):
    ch = shared_meshd.tls_channel()
    req_cls, call = _reflected_call(ch)
    tok = shared_meshd.token("ghz", "load")
    resp = call(req_cls(csr=_csr_pem(), validity_duration=3600),
                metadata=[("authorization", f"Bearer {tok}"), ("clusterid", "Kubernetes")],
                timeout=RPC_TIMEOUT_S)
    assert len(resp.cert_chain) == 2
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/ghz/sa/load"]


def test_reflected_create_certificate_on_plaintext_is_unauthenticated(shared_meshd):
    ch = shared_meshd.plaintext_channel()
    req_cls, call = _reflected_call(ch)
    tok = shared_meshd.token("ghz", "load")
    with pytest.raises(grpc.RpcError) as ei:
        call(req_cls(csr=_csr_pem()), metadata=[("authorization", f"Bearer {tok}")], timeout=RPC_TIMEOUT_S)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, ei.value.details()


# --------------------------------------------------------------------------------------------
# grpc.health.v1, with a descriptor built here (independent of the server's reflection)
# --------------------------------------------------------------------------------------------


def _health_messages():
    fdp = descriptor_pb2.FileDescriptorProto(name="interop/grpc_health_v1.proto", package="grpc.health.v1",
                                             syntax="proto3")
    req = fdp.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=FieldDescriptor.TYPE_STRING, label=FieldDescriptor.LABEL_OPTIONAL)
    resp = fdp.message_type.add(name="HealthCheckResponse")
    enum = resp.enum_type.add(name="ServingStatus")
    for i, n in enumerate(["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]):
        enum.value.add(name=n, number=i)
    resp.field.add(name="status", number=1, type=FieldDescriptor.TYPE_ENUM, label=FieldDescriptor.LABEL_OPTIONAL,
                   type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    req_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
    resp_desc = pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
    return req_cls, message_factory.GetMessageClass(resp_desc), resp_desc.enum_types_by_name["ServingStatus"]


def _health_check(ch: grpc.Channel, service: str):
    req_cls, resp_cls, status_enum = _health_messages()
    call = ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=req_cls.SerializeToString,
                          response_deserializer=resp_cls.FromString)
    resp = call(req_cls(service=service), timeout=RPC_TIMEOUT_S)
    return status_enum.values_by_number[resp.status].name


@pytest.mark.parametrize("service", ["", CA_SERVICE], ids=["server", "ca-service"])
@pytest.mark.parametrize("port", PORTS)
def test_health_check_serving(shared_meshd, port, service):
    assert _health_check(channel(shared_meshd, port), service) == "SERVING"


@pytest.mark.parametrize("port", PORTS)
def test_health_check_unknown_service_is_not_found(shared_meshd, port):
    with pytest.raises(grpc.RpcError) as ei:
        _health_check(channel(shared_meshd, port), "no.such.Service")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND, ei.value.details()
