"""deploy/ (Kustomize bases and overlays), the Dockerfile and .dockerignore.

1. Every kustomization under deploy/ is rendered by `render()` below: a deliberately small
   Kustomize that implements only what these files use (`resources` of files and directories,
   `patches` of JSON 6902 operations with a `target`, `images`) and refuses any other field, so a
   manifest can never silently mean something else to real Kustomize. Every rendered object is
   validated against the Kubernetes OpenAPI schemas shipped in the `kubernetes-validate` wheel
   (offline), in strict mode (unknown fields are errors), for Kubernetes 1.33 (meshd's
   k8s-openapi feature) and the newest version the wheel has; the Istio kinds (Gateway,
   VirtualService), which the wheel has no schema for, against `ISTIO_SCHEMAS` below, as strictly.
   A YAML file under deploy/ that no kustomization uses fails the suite.
2. Facts of the deployment (replicas, PDB, HPA, ports, selectors, webhooks, the remote's
   annotation, EndpointSlice and injection path), every Deployment flag and environment variable
   against src/config.rs, the Dockerfile's shape (no Docker engine here: static checks only).
   Multi-network (Istio's "Install Primary-Remote on different networks"): the east-west gateway
   of each network (ports and their names, network label, `gateway` injection template,
   ISTIO_META_REQUESTED_NETWORK_VIEW, which injection webhook selects its pods), expose-istiod and
   expose-services exactly as Istio's samples and consistent with the Services they route to, the
   remote's istiod EndpointSlice against every address it may point at, meshd's own /validate
   admitting the Istio objects, and deploy/README.md's copy-and-edit commands and step order.
3. The manifests on fake API servers (examples/fake_apiserver, real REST over HTTPS): applied
   with the admin token, read back, their (Cluster)RoleBindings turned into the fake's grants (it
   does not evaluate RBAC objects by itself), `meshd create-remote-secret` run against the remote
   without --create-service-account, and the resulting tokens checked against what meshd needs;
   then meshd itself runs with the Deployment's arguments and environment against the primary
   and reaches the remote through the applied remote secret, and finds both networks' east-west
   gateways from their Services.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import fnmatch
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import (
    _ALL_PROCESSES,
    MESHD_BIN,
    REPO_ROOT,
    _end_process,
    _StderrCollector,
    child_env,
    parse_listeners,
    start_meshd,
)
from envoy_helpers import wait_until

DEPLOY = REPO_ROOT / "deploy"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
CONFIG_RS = REPO_ROOT / "src" / "config.rs"

#: meshd's Kubernetes API version (k8s-openapi feature v1_33) and the newest the wheel knows.
K8S_VERSIONS = ("1.33", kubernetes_validate.latest_version())

#: Documentation addresses (never contacted): the placeholder in deploy/remote and the example
#: address of the overlays (cluster1's east-west gateway IP; istiod-lb's in the same-network
#: variant).
PLACEHOLDER_IP = "192.0.2.10"
EXAMPLE_LB_IP = "203.0.113.10"

READER_SA = "istio-reader-service-account"
READER_USER = f"system:serviceaccount:istio-system:{READER_SA}"
ISTIOD_USER = "system:serviceaccount:istio-system:istiod"
EASTWEST = "istio-eastwestgateway"
EASTWEST_USER = f"system:serviceaccount:istio-system:{EASTWEST}"
NETWORK_LABEL = "topology.istio.io/network"
#: Istio's east-west gateway Service ports (gateway chart `networkGateway`,
#: gen-eastwest-gateway.sh): name -> port (= targetPort).
EASTWEST_PORTS = {"status-port": 15021, "tls": 15443, "tls-istiod": 15012, "tls-webhook": 15017}
#: Each cluster of the walk-through: its network, its east-west gateway overlay and the overlay
#: that installs meshd (cluster1) or the remote's plumbing (cluster2).
CLUSTERS = {
    "cluster1": ("network1", "overlays/eastwest-cluster1", "overlays/primary-example"),
    "cluster2": ("network2", "overlays/eastwest-cluster2", "overlays/remote-example"),
}
START_TIMEOUT_S = 60.0
CONVERGE_TIMEOUT_S = 60.0


# ============================================================================================
# A minimal Kustomize
# ============================================================================================

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
PATCH_FIELDS = {"path", "patch", "target"}
TARGET_FIELDS = {"group", "version", "kind", "name", "namespace"}
IMAGE_FIELDS = {"name", "newName", "newTag"}

#: Apply order (Kustomize's legacy order, which kubectl apply -k uses): namespaces and RBAC
#: before what needs them, webhooks last.
KIND_ORDER = [
    "Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
    "Role", "RoleBinding", "ConfigMap", "Secret", "Service", "EndpointSlice", "Deployment",
    "PodDisruptionBudget", "HorizontalPodAutoscaler", "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
]


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f"{path}: not a Kubernetes object: {d!r}"
        assert d.get("metadata", {}).get("name"), f"{path}: {d['kind']} without metadata.name"
    return docs


def group_of(obj: dict) -> str:
    av = obj["apiVersion"]
    return av.split("/")[0] if "/" in av else ""


def version_of(obj: dict) -> str:
    return obj["apiVersion"].split("/")[-1]


def obj_id(obj: dict) -> tuple[str, str, str, str]:
    md = obj["metadata"]
    return (group_of(obj), obj["kind"], md.get("namespace", ""), md["name"])


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer {path!r} must start with /"
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _container(doc, token: str, *, for_add: bool = False):
    if isinstance(doc, list):
        if for_add and token == "-":
            return len(doc)
        i = int(token)
        assert 0 <= i < len(doc) + (1 if for_add else 0), f"index {i} out of range"
        return i
    assert isinstance(doc, dict), f"cannot index {type(doc).__name__} with {token!r}"
    if not for_add:
        assert token in doc, f"member {token!r} is missing"
    return token


def json6902(obj: dict, ops: list[dict]) -> dict:
    """RFC 6902 add/remove/replace/test, as Kustomize applies a JSON 6902 patch."""
    assert isinstance(ops, list), "only JSON 6902 patches (a list of operations) are supported"
    out = copy.deepcopy(obj)
    for op in ops:
        kind, parts = op["op"], _pointer(op["path"])
        assert kind in {"add", "remove", "replace", "test"}, f"unsupported JSON patch op {kind!r}"
        parent = out
        for p in parts[:-1]:
            parent = parent[_container(parent, p)]
        last = parts[-1]
        if kind == "add":
            key = _container(parent, last, for_add=True)
            if isinstance(parent, list):
                parent.insert(key, copy.deepcopy(op["value"]))
            else:
                parent[key] = copy.deepcopy(op["value"])
        elif kind == "remove":
            key = _container(parent, last)
            del parent[key]
        elif kind == "replace":
            key = _container(parent, last)
            parent[key] = copy.deepcopy(op["value"])
        else:
            key = _container(parent, last)
            assert parent[key] == op["value"], f"test of {op['path']} failed"
    return out


def _matches(obj: dict, target: dict) -> bool:
    want = {
        "group": group_of(obj),
        "version": version_of(obj),
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "namespace": obj["metadata"].get("namespace", ""),
    }
    return all(want[k] == v for k, v in target.items())


def _pod_specs(obj: dict):
    spec = obj.get("spec", {})
    if obj["kind"] == "Pod":
        yield spec
    elif isinstance(spec.get("template"), dict):
        yield spec["template"].get("spec", {})


def _set_image(image: str, rule: dict) -> str:
    name, tag = image, ""
    if ":" in image.rsplit("/", 1)[-1]:
        name, tag = image.rsplit(":", 1)
    if name != rule["name"]:
        return image
    new_tag = rule.get("newTag", tag)
    return f"{rule.get('newName', name)}:{new_tag}" if new_tag else rule.get("newName", name)


@dataclass
class Rendered:
    objects: list[dict]
    files: set[Path]


def render(directory: Path) -> Rendered:
    """`kustomize build directory`, for the subset of Kustomize described at the top."""
    kfile = directory / "kustomization.yaml"
    assert kfile.is_file(), f"{directory} has no kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unknown = set(k) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{kfile}: fields {sorted(unknown)} are not implemented by this test's renderer; extend render()"
    assert k.get("apiVersion") == "kustomize.config.k8s.io/v1beta1" and k.get("kind") == "Kustomization", kfile
    files = {kfile.resolve()}
    objects: list[dict] = []
    for r in k.get("resources", []):
        p = (directory / r).resolve()
        if p.is_dir():
            sub = render(p)
            objects += sub.objects
            files |= sub.files
        else:
            assert p.is_file(), f"{kfile}: resource {r} does not exist"
            # Kustomize's default load restrictor: files only from inside the kustomization root.
            assert p.is_relative_to(directory.resolve()), f"{kfile}: file {r} is outside {directory}"
            objects += load_docs(p)
            files.add(p)
    for patch in k.get("patches", []):
        assert set(patch) <= PATCH_FIELDS, f"{kfile}: patch fields {sorted(set(patch) - PATCH_FIELDS)}"
        target = patch.get("target")
        assert target and set(target) <= TARGET_FIELDS, f"{kfile}: every patch needs a target ({sorted(TARGET_FIELDS)})"
        if "path" in patch:
            ppath = (directory / patch["path"]).resolve()
            assert ppath.is_relative_to(directory.resolve()), f"{kfile}: patch {patch['path']} is outside {directory}"
            files.add(ppath)
            ops = yaml.safe_load(ppath.read_text())
        else:
            ops = yaml.safe_load(patch["patch"])
        hits = [i for i, o in enumerate(objects) if _matches(o, target)]
        assert hits, f"{kfile}: patch target {target} matches nothing"
        for i in hits:
            objects[i] = json6902(objects[i], ops)
    for rule in k.get("images", []):
        assert set(rule) <= IMAGE_FIELDS and "name" in rule, f"{kfile}: image rule {rule}"
        for o in objects:
            for ps in _pod_specs(o):
                for c in ps.get("containers", []) + ps.get("initContainers", []):
                    c["image"] = _set_image(c["image"], rule)
    ids = [obj_id(o) for o in objects]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, f"{kfile}: objects defined twice: {sorted(dupes)}"
    order = {kind: n for n, kind in enumerate(KIND_ORDER)}
    objects.sort(key=lambda o: order.get(o["kind"], len(KIND_ORDER) // 2))
    return Rendered(objects=objects, files=files)


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def find(objects: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


@pytest.fixture(scope="module")
def primary() -> list[dict]:
    return render(DEPLOY / "primary").objects


@pytest.fixture(scope="module")
def remote() -> list[dict]:
    return render(DEPLOY / "remote").objects


# ============================================================================================
# Istio objects: a strict schema (kubernetes-validate has none for CRDs)
# ============================================================================================

ISTIO_GROUPS = {"networking.istio.io", "security.istio.io", "telemetry.istio.io"}


@dataclass(frozen=True)
class MapOf:
    """An object with free keys (a label map) whose values all have one spec."""
    value: object


@dataclass(frozen=True)
class Enum:
    values: frozenset
    case_insensitive: bool = False


@dataclass(frozen=True)
class Range:
    lo: int
    hi: int


_PORT_NUMBER = Range(1, 65535)
#: Istio's port protocols (`protocol.Parse` is case-insensitive: Istio's own expose-istiod.yaml
#: says `tls`).
_PROTOCOLS = Enum(frozenset({"HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "HTTP_PROXY", "MONGO",
                             "REDIS", "MYSQL", "TCP", "TLS", "UDP"}), case_insensitive=True)
_TLS_VERSIONS = Enum(frozenset({"TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"}))
_ROUTE_DESTINATION = {
    "destination": {"host": str, "subset": str, "port": {"number": _PORT_NUMBER}},
    "weight": Range(0, 100),
}
#: Istio's networking.istio.io/v1 API (networking/v1alpha3/{gateway,virtual_service}.proto, JSON
#: names) as far as deploy/ may use it: a dict is an object with exactly these optional fields,
#: [x] a list of x. Fields not listed (VirtualService `http`, say) are refused: add them here, from
#: the proto, when a manifest needs them.
ISTIO_SCHEMAS = {
    ("networking.istio.io/v1", "Gateway"): {
        "selector": MapOf(str),
        "servers": [{
            "port": {"number": _PORT_NUMBER, "protocol": _PROTOCOLS, "name": str, "targetPort": _PORT_NUMBER},
            "bind": str,
            "hosts": [str],
            "tls": {
                "httpsRedirect": bool,
                "mode": Enum(frozenset({"PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL",
                                        "OPTIONAL_MUTUAL"})),
                "serverCertificate": str, "privateKey": str, "caCertificates": str, "caCrl": str,
                "credentialName": str, "subjectAltNames": [str], "verifyCertificateSpki": [str],
                "verifyCertificateHash": [str], "minProtocolVersion": _TLS_VERSIONS,
                "maxProtocolVersion": _TLS_VERSIONS, "cipherSuites": [str],
            },
            "defaultEndpoint": str,
            "name": str,
        }],
    },
    ("networking.istio.io/v1", "VirtualService"): {
        "hosts": [str],
        "gateways": [str],
        "exportTo": [str],
        "tls": [{
            "match": [{
                "sniHosts": [str], "destinationSubnets": [str], "port": _PORT_NUMBER,
                "sourceLabels": MapOf(str), "gateways": [str], "sourceNamespace": str,
            }],
            "route": [_ROUTE_DESTINATION],
        }],
        "tcp": [{
            "match": [{
                "destinationSubnets": [str], "port": _PORT_NUMBER, "sourceSubnet": str,
                "sourceLabels": MapOf(str), "gateways": [str], "sourceNamespace": str,
            }],
            "route": [_ROUTE_DESTINATION],
        }],
    },
}
_ISTIO_METADATA = {"name": str, "namespace": str, "labels": MapOf(str), "annotations": MapOf(str)}


def _check_spec(spec, value, path: str, errors: list[str]):
    def wrong(what: str):
        errors.append(f"{path}: expected {what}, got {value!r}")

    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return wrong("an object")
        for k, v in value.items():
            if k in spec:
                _check_spec(spec[k], v, f"{path}.{k}", errors)
            else:
                errors.append(f"{path}.{k}: unknown field")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            return wrong("a list")
        for i, v in enumerate(value):
            _check_spec(spec[0], v, f"{path}[{i}]", errors)
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return wrong("a map")
        for k, v in value.items():
            _check_spec(spec.value, v, f"{path}[{k}]", errors)
    elif isinstance(spec, Enum):
        if not isinstance(value, str):
            return wrong("a string")
        if (value.upper() if spec.case_insensitive else value) not in spec.values:
            wrong(f"one of {sorted(spec.values)}")
    elif isinstance(spec, Range):
        if not (isinstance(value, int) and not isinstance(value, bool) and spec.lo <= value <= spec.hi):
            wrong(f"an integer in {spec.lo}..{spec.hi}")
    elif spec is bool or spec is str:
        if not isinstance(value, spec):
            wrong(spec.__name__)
    else:
        raise AssertionError(f"bad spec {spec!r}")


def validate_istio(obj: dict) -> list[str]:
    """Errors of an Istio object against ISTIO_SCHEMAS (strict: unknown fields are errors)."""
    spec = ISTIO_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
    if spec is None:
        return [f"no schema for {obj.get('apiVersion')} {obj.get('kind')} in ISTIO_SCHEMAS"]
    errors = [f"{k}: unknown field" for k in set(obj) - {"apiVersion", "kind", "metadata", "spec"}]
    _check_spec(_ISTIO_METADATA, obj.get("metadata"), "metadata", errors)
    if not isinstance(obj.get("spec"), dict) or not obj["spec"]:
        errors.append("spec: missing")
    else:
        _check_spec(spec, obj["spec"], "spec", errors)
    return errors


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector against a set of labels, as the API server evaluates a webhook's
    namespaceSelector and objectSelector (an absent or empty selector matches everything)."""
    if not selector:
        return True
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In":
            ok = key in labels and labels[key] in values
        elif op == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif op == "Exists":
            ok = key in labels
        elif op == "DoesNotExist":
            ok = key not in labels
        else:
            raise AssertionError(f"unknown operator {op!r}")
        if not ok:
            return False
    return True


# ============================================================================================
# 1. Rendering, coverage, schema validation
# ============================================================================================


def test_every_manifest_under_deploy_is_rendered():
    dirs = kustomization_dirs()
    rel = {d.relative_to(DEPLOY).as_posix() for d in dirs}
    assert {"primary", "remote", "overlays/primary-example", "overlays/remote-example", "eastwest",
            "overlays/eastwest-cluster1", "overlays/eastwest-cluster2", "expose-istiod", "expose-services",
            "istiod-lb", "overlays/remote-same-network"} <= rel, rel
    used: set[Path] = set()
    for d in dirs:
        used |= render(d).files
    everything = {p.resolve() for p in DEPLOY.rglob("*") if p.is_file()}
    docs = {p for p in everything if p.suffix == ".md"}
    others = everything - docs - used
    assert not others, (
        "files under deploy/ that no kustomization uses (add them to one, or they are never "
        f"validated): {sorted(str(p.relative_to(DEPLOY)) for p in others)}"
    )
    assert not {p for p in used if p.suffix not in (".yaml", ".yml")}, "manifests must be YAML"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", [d.relative_to(DEPLOY).as_posix() for d in kustomization_dirs()])
def test_rendered_objects_validate_against_kubernetes_schemas(directory, version):
    objects = render(DEPLOY / directory).objects
    assert objects
    errors = []
    for o in objects:
        if group_of(o) in ISTIO_GROUPS:
            # No schema in the wheel (a CRD): the strict check of ISTIO_SCHEMAS instead.
            errors += [f"{o['kind']}/{o['metadata']['name']}: {e}" for e in validate_istio(o)]
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {e.message}")
    assert not errors, f"deploy/{directory} against Kubernetes {version}:\n" + "\n".join(errors)


def test_strict_validation_refuses_unknown_fields_and_wrong_types(primary):
    """The validator really is strict: a misspelt field or a wrong type fails."""
    dep = copy.deepcopy(find(primary, "Deployment", "istiod"))
    kubernetes_validate.validate(dep, "1.33", strict=True)
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, "1.33", strict=True)
    wrong = copy.deepcopy(dep)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, "1.33", strict=True)


def test_istio_schema_check_is_strict():
    """validate_istio really refuses what kube-apiserver's CRD schema (or Istio's webhook) would:
    a misspelt field, a wrong type, an unknown enum value, a kind without a schema."""
    [gw, vs] = render(DEPLOY / "expose-istiod").objects
    assert validate_istio(gw) == [] and validate_istio(vs) == []
    bad = []
    g = copy.deepcopy(gw)
    g["spec"]["servers"][0]["tls"]["mod"] = "PASSTHROUGH"
    bad.append((g, "spec.servers[0].tls.mod: unknown field"))
    g = copy.deepcopy(gw)
    g["spec"]["servers"][1]["tls"]["mode"] = "AUTOPASSTHROUGH"
    bad.append((g, "spec.servers[1].tls.mode: expected one of"))
    g = copy.deepcopy(gw)
    g["spec"]["servers"][0]["port"]["number"] = "15012"
    bad.append((g, "spec.servers[0].port.number: expected an integer"))
    g = copy.deepcopy(gw)
    g["spec"]["servers"][0]["port"]["protocol"] = "tlss"
    bad.append((g, "spec.servers[0].port.protocol: expected one of"))
    g = copy.deepcopy(gw)
    g["spec"]["selector"] = ["istio=eastwestgateway"]
    bad.append((g, "spec.selector: expected a map"))
    v = copy.deepcopy(vs)
    v["spec"]["tls"][0]["match"][0]["sniHost"] = ["*"]
    bad.append((v, "spec.tls[0].match[0].sniHost: unknown field"))
    v = copy.deepcopy(vs)
    v["spec"]["tls"][1]["route"][0]["destination"]["port"] = 443
    bad.append((v, "spec.tls[1].route[0].destination.port: expected an object"))
    v = copy.deepcopy(vs)
    v["spec"]["http"] = [{"route": [{"destination": {"host": "x"}}]}]
    bad.append((v, "spec.http: unknown field"))
    v = copy.deepcopy(vs)
    v["status"] = {}
    bad.append((v, "status: unknown field"))
    v = copy.deepcopy(vs)
    v["apiVersion"] = "networking.istio.io/v1alpha3"
    bad.append((v, "no schema for networking.istio.io/v1alpha3 VirtualService"))
    for obj, want in bad:
        errors = validate_istio(obj)
        assert any(e.startswith(want) for e in errors), (want, errors)


def test_names_and_port_names_are_valid():
    """What the JSON schemas cannot say: DNS names and IANA_SVC_NAME port names."""
    dns1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    svc_name = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    every = [o for d in kustomization_dirs() for o in render(d).objects]
    assert {o["kind"] for o in every} >= {"Deployment", "Service", "EndpointSlice", "Gateway"}
    for o in every:
        assert dns1123.match(o["metadata"]["name"]) and len(o["metadata"]["name"]) <= 253, o["metadata"]["name"]
        ports = list(o.get("spec", {}).get("ports", []) if o["kind"] == "Service" else [])
        ports += o.get("ports", []) if o["kind"] == "EndpointSlice" else []
        for ps in _pod_specs(o):
            for c in ps["containers"]:
                ports += c.get("ports", [])
        for p in ports:
            assert svc_name.match(p["name"]) and len(p["name"]) <= 15 and "--" not in p["name"], p
        # Label values (the network names among them) as the API server checks them.
        label_value = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
        labels = dict(o["metadata"].get("labels", {}))
        labels.update(o.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}))
        for k, v in labels.items():
            assert isinstance(v, str) and label_value.match(v) and len(v) <= 63, (o["metadata"]["name"], k, v)


# ============================================================================================
# 2. Facts
# ============================================================================================


def serve_flags_and_env() -> tuple[set[str], dict[str, str]]:
    """The long flags of `meshd serve` and its environment variables (name -> flag), read from
    src/config.rs."""
    text = CONFIG_RS.read_text()
    flags, envs = set(), {}
    for struct in ("ServeArgs", "LogArgs"):
        m = re.search(r"pub struct " + struct + r" \{(.*?)\n\}", text, re.S)
        assert m, f"struct {struct} not found in {CONFIG_RS}"
        for attr, field in re.findall(r"#\[arg\((.*?)\)\]\s*\n\s*pub (\w+):", m.group(1)):
            if not re.search(r"\blong\b", attr):
                continue
            long = re.search(r'long\s*=\s*"([^"]+)"', attr)
            flag = long.group(1) if long else field.replace("_", "-")
            flags.add(flag)
            env = re.search(r'env\s*=\s*"([^"]+)"', attr)
            if env:
                envs[env.group(1)] = flag
    assert {"cluster-id", "data-dir", "ca-dir", "network", "log-format"} <= flags, flags
    assert {"CLUSTER_ID", "ISTIOD_CUSTOM_HOST", "POD_NAME", "POD_NAMESPACE", "MESHD_NETWORK"} <= set(envs), envs
    return flags, envs


def deployment_container(objects: list[dict]) -> dict:
    containers = find(objects, "Deployment", "istiod")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def parse_args(args: list[str]) -> dict[str, str]:
    assert args[0] == "serve", args
    out = {}
    rest = args[1:]
    while rest:
        a = rest.pop(0)
        assert a.startswith("--"), f"positional argument {a!r}"
        name, eq, value = a[2:].partition("=")
        if not eq:
            value = rest.pop(0)
        out[name] = value
    return out


def env_of(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_deployment_flags_and_env_exist_in_config_rs(primary):
    flags, envs = serve_flags_and_env()
    c = deployment_container(primary)
    args = parse_args(c["args"])
    assert set(args) <= flags, f"flags meshd serve does not have: {sorted(set(args) - flags)}"
    env = env_of(c)
    assert set(env) <= set(envs), f"environment variables meshd does not read: {sorted(set(env) - set(envs))}"
    overlay = deployment_container(render(DEPLOY / "overlays" / "primary-example").objects)
    assert set(env_of(overlay)) <= set(envs)


def test_primary_deployment(primary):
    dep = find(primary, "Deployment", "istiod")
    assert dep["metadata"]["namespace"] == "istio-system"
    assert dep["spec"]["replicas"] == 2
    tpl = dep["spec"]["template"]
    pod_labels = tpl["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items())
    spec = tpl["spec"]
    assert spec["serviceAccountName"] == "istiod"
    assert find(primary, "ServiceAccount", "istiod")["metadata"]["namespace"] == "istio-system"
    c = deployment_container(primary)
    assert c["image"].split(":")[0] == "meshd"
    args = parse_args(c["args"])
    env = env_of(c)
    # Settings: env/0 and env/1 are what the overlays patch by index.
    assert [e["name"] for e in c["env"][:2]] == ["CLUSTER_ID", "MESHD_NETWORK"]
    assert env["CLUSTER_ID"] == "cluster1" and env["MESHD_NETWORK"] == "network1"
    assert env["POD_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
    assert "KUBECONFIG" not in env, "in a pod meshd uses the in-cluster config"
    # Ports and readiness.
    ports = {p["containerPort"]: p["name"] for p in c["ports"]}
    assert set(ports) == {15010, 15012, 15014, 15017, 8080}, ports
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/ready", 8080)
    # Hardening.
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert c["resources"]["requests"]["cpu"], "the HPA's CPU utilization needs a CPU request"
    # Volumes: the data dir is writable (read-only root fs), cacerts is where --ca-dir points.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    data = mounts[args["data-dir"]]
    assert "emptyDir" in volumes[data["name"]] and not data.get("readOnly")
    ca = mounts[args["ca-dir"]]
    assert ca["readOnly"] is True and args["ca-dir"] == "/etc/cacerts"
    assert volumes[ca["name"]]["secret"]["secretName"] == "cacerts"
    # meshd --ca-dir refuses an empty directory: the Secret is required, not optional.
    assert volumes[ca["name"]]["secret"]["optional"] is False


def test_primary_pdb_and_hpa(primary):
    dep = find(primary, "Deployment", "istiod")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    pdb = find(primary, "PodDisruptionBudget", "istiod")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["minAvailable"] == 1
    assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    hpa = find(primary, "HorizontalPodAutoscaler", "istiod")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", "istiod")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 80}
    assert hpa["spec"]["minReplicas"] == dep["spec"]["replicas"]


def service_ports(svc: dict) -> dict[int, tuple[int, str]]:
    return {p["port"]: (p.get("targetPort", p["port"]), p["name"]) for p in svc["spec"]["ports"]}


def test_primary_services(primary):
    dep = find(primary, "Deployment", "istiod")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["containerPort"] for p in deployment_container(primary)["ports"]}
    # Nothing of the primary base is exposed outside the cluster: remote clusters reach meshd
    # through the east-west gateway (deploy/expose-istiod) or, on one network, deploy/istiod-lb.
    assert [o["metadata"]["name"] for o in primary if o["kind"] == "Service"] == ["istiod"]
    lb = find(render(DEPLOY / "istiod-lb").objects, "Service", "istiod-lb")
    assert lb["spec"]["type"] == "LoadBalancer"
    assert service_ports(lb) == {15012: (15012, "tcp-istiod"), 15017: (15017, "tcp-webhook")}
    svc = find(primary, "Service", "istiod")
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service_ports(svc) == {
        15010: (15010, "grpc-xds"),
        15012: (15012, "https-dns"),
        443: (15017, "https-webhook"),
        15014: (15014, "http-monitoring"),
    }
    for s in (lb, svc):
        assert s["metadata"]["namespace"] == "istio-system"
        assert all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
        assert {t for t, _ in service_ports(s).values()} <= container_ports


def _webhooks(cfg: dict) -> dict[str, dict]:
    hooks = {}
    for hook in cfg["webhooks"]:
        assert "caBundle" not in hook["clientConfig"], "meshd patches the caBundle"
        assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
        svc = hook["clientConfig"]["service"]
        assert (svc["name"], svc["namespace"], svc["port"]) == ("istiod", "istio-system", 443)
        hooks[hook["name"]] = hook
    assert len(hooks) == len(cfg["webhooks"]), "webhook names must be unique"
    return hooks


#: Istio's two default-revision injection webhooks (istio-discovery chart, no revision).
INJECTION_HOOKS = ["namespace.sidecar-injector.istio.io", "object.sidecar-injector.istio.io"]


def _injection_hooks(cfg: dict, path: str) -> dict[str, dict]:
    hooks = _webhooks(cfg)
    assert list(hooks) == INJECTION_HOOKS
    for hook in hooks.values():
        assert hook["clientConfig"]["service"]["path"] == path
        assert hook["failurePolicy"] == "Fail" and hook["reinvocationPolicy"] == "Never"
        [rule] = hook["rules"]
        assert (rule["apiGroups"], rule["apiVersions"], rule["resources"], rule["operations"]) == (
            [""], ["v1"], ["pods"], ["CREATE"])
    ns, obj = hooks[INJECTION_HOOKS[0]], hooks[INJECTION_HOOKS[1]]
    assert ns["namespaceSelector"] == {"matchLabels": {"istio-injection": "enabled"}}
    assert ns["objectSelector"] == {"matchExpressions": [
        {"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]}
    assert obj["namespaceSelector"] == {"matchExpressions": [
        {"key": "istio-injection", "operator": "DoesNotExist"}, {"key": "istio.io/rev", "operator": "DoesNotExist"}]}
    assert obj["objectSelector"] == {"matchExpressions": [
        {"key": "sidecar.istio.io/inject", "operator": "In", "values": ["true"]},
        {"key": "istio.io/rev", "operator": "DoesNotExist"}]}
    return hooks


def config_default(env: str) -> str:
    """The default value of the `meshd serve` setting with this environment variable."""
    # One #[arg(...)] attribute, on one line or wrapped by rustfmt over several.
    attr = r'#\[arg\((?:(?!\)\]).)*?'
    m = re.search(attr + r'env = "' + env + r'"(?:(?!\)\]).)*?default_value = "([^"]*)"', CONFIG_RS.read_text(), re.S)
    assert m, f"no default for {env} in {CONFIG_RS}"
    return m.group(1)


def test_webhook_names_are_the_ones_meshd_patches(primary, remote):
    injector = config_default("INJECTION_WEBHOOK_CONFIG_NAME")
    validator = config_default("VALIDATION_WEBHOOK_CONFIG_NAME")
    assert (injector, validator) == ("istio-sidecar-injector", "istio-validator-istio-system")
    assert {o["metadata"]["name"] for o in primary if o["kind"] == "MutatingWebhookConfiguration"} == {injector}
    assert {o["metadata"]["name"] for o in primary if o["kind"] == "ValidatingWebhookConfiguration"} == {validator}
    assert {o["metadata"]["name"] for o in remote if o["kind"] == "MutatingWebhookConfiguration"} == {injector}
    # The RBAC lets meshd write exactly those.
    for objects in (primary, remote):
        named = {n for o in objects if o["kind"] == "ClusterRole" for r in o["rules"]
                 if "update" in r["verbs"] and "admissionregistration.k8s.io" in r["apiGroups"]
                 for n in r.get("resourceNames", [])}
        assert named == {injector, validator}, named


def test_primary_webhooks(primary):
    _injection_hooks(find(primary, "MutatingWebhookConfiguration", "istio-sidecar-injector"), "/inject")
    [val] = _webhooks(find(primary, "ValidatingWebhookConfiguration", "istio-validator-istio-system")).values()
    assert val["clientConfig"]["service"]["path"] == "/validate"
    [rule] = val["rules"]
    assert rule["apiGroups"] == ["networking.istio.io"]
    assert set(rule["apiVersions"]) == {"v1", "v1beta1", "v1alpha3"}
    assert set(rule["resources"]) == {"gateways", "virtualservices", "destinationrules"}
    assert set(rule["operations"]) == {"CREATE", "UPDATE"}


def test_remote_objects(remote):
    ns = find(remote, "Namespace", "istio-system")
    assert ns["metadata"]["annotations"]["topology.istio.io/controlPlaneClusters"] == "cluster1"
    assert ns["metadata"]["labels"]["topology.istio.io/network"] == "network2"
    svc = find(remote, "Service", "istiod")
    assert svc["metadata"]["namespace"] == "istio-system"
    assert "selector" not in svc["spec"], "the remote istiod Service must have no selector"
    # Istio's remote-istiod-service.yaml: 15012, and 443 -> 15017.
    assert service_ports(svc) == {15012: (15012, "tcp-istiod"), 443: (15017, "tcp-webhook")}
    eps = find(remote, "EndpointSlice", "istiod-primary")
    assert eps["apiVersion"] == "discovery.k8s.io/v1" and eps["addressType"] == "IPv4"
    assert eps["metadata"]["namespace"] == "istio-system"
    assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == "istiod"
    [endpoint] = eps["endpoints"]
    assert endpoint["addresses"] == [PLACEHOLDER_IP]
    # Istio's remote-istiod-endpointslices.yaml; kube-proxy pairs the Service's and the slice's
    # ports by name (test_remote_endpointslice_fits_every_address_it_may_point_at: the numbers).
    assert {p["name"]: p["port"] for p in eps["ports"]} == {"tcp-istiod": 15012, "tcp-webhook": 15017}
    # The remote's injector is the primary's, at this cluster's path.
    cfg = find(remote, "MutatingWebhookConfiguration", "istio-sidecar-injector")
    _injection_hooks(cfg, "/inject/cluster/cluster2/net/network2")
    p_cfg = find(render(DEPLOY / "primary").objects, "MutatingWebhookConfiguration", "istio-sidecar-injector")
    at_primary_path = json6902(cfg, [{"op": "replace", "path": f"/webhooks/{i}/clientConfig/service/path", "value": "/inject"}
                                     for i in range(len(cfg["webhooks"]))])
    assert at_primary_path["webhooks"] == p_cfg["webhooks"]
    sa = find(remote, "ServiceAccount", READER_SA)
    assert sa["metadata"]["namespace"] == "istio-system"
    assert not [o for o in remote if o["kind"] in ("Deployment", "ValidatingWebhookConfiguration")]


def test_overlays_set_cluster_settings_and_the_same_lb_ip():
    p = render(DEPLOY / "overlays" / "primary-example").objects
    c = deployment_container(p)
    env = env_of(c)
    assert (env["CLUSTER_ID"], env["MESHD_NETWORK"], env["ISTIOD_CUSTOM_HOST"]) == ("cluster1", "network1", EXAMPLE_LB_IP)
    assert c["image"] == "registry.example.com/meshd:0.1.0"
    # The namespace's network label (endpoints) and MESHD_NETWORK (injected proxies) agree, in the
    # base and in the overlay (Istio issue 46772: the two disagreeing breaks cross-network routing).
    for objects in (p, render(DEPLOY / "primary").objects):
        ns = find(objects, "Namespace", "istio-system")
        assert ns["metadata"]["labels"][NETWORK_LABEL] == env_of(deployment_container(objects))["MESHD_NETWORK"]
    r = render(DEPLOY / "overlays" / "remote-example").objects
    eps = find(r, "EndpointSlice", "istiod-primary")
    assert eps["endpoints"][0]["addresses"] == [EXAMPLE_LB_IP]
    # Everything else is the base, unchanged.
    base = {obj_id(o): o for o in render(DEPLOY / "remote").objects}
    changed = [obj_id(o) for o in r if base[obj_id(o)] != o]
    assert changed == [obj_id(eps)]


def test_readme_self_signed_patch_removes_the_cacerts_mount(primary):
    """deploy/README.md's JSON 6902 snippet for running without cacerts does what it says."""
    text = (DEPLOY / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    [ops] = [b for b in blocks if isinstance(b, list) and all(isinstance(op, dict) and "op" in op for op in b)]
    dep = json6902(find(primary, "Deployment", "istiod"), ops)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert "ca-dir" not in parse_args(c["args"]) and "data-dir" in parse_args(c["args"])
    assert "cacerts" not in {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert "/etc/cacerts" not in {m["mountPath"] for m in c["volumeMounts"]}
    kubernetes_validate.validate(dep, "1.33", strict=True)


def test_reader_rbac_file_is_unchanged_in_shape():
    """reader-rbac.yaml stays exactly what --create-service-account creates (a Rust unit test
    compares it field by field); the webhook permission lives in webhook-rbac.yaml."""
    docs = load_docs(DEPLOY / "remote" / "reader-rbac.yaml")
    assert [d["kind"] for d in docs] == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
    assert not any("admissionregistration.k8s.io" in r["apiGroups"] for r in docs[1]["rules"])


# ============================================================================================
# Different networks: east-west gateways, expose-istiod, expose-services, the remote's address
# ============================================================================================

ISTIOD_HOST = "istiod.istio-system.svc.cluster.local"


def eastwest(directory: str = "eastwest") -> dict[str, dict]:
    """An east-west gateway's objects (base or overlay), by kind."""
    by_kind: dict[str, dict] = {}
    for o in render(DEPLOY / directory).objects:
        assert o["kind"] not in by_kind, f"two {o['kind']} in deploy/{directory}"
        assert (o["metadata"]["name"], o["metadata"]["namespace"]) == (EASTWEST, "istio-system"), obj_id(o)
        by_kind[o["kind"]] = o
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding", "Deployment", "Service", "HorizontalPodAutoscaler"}
    return by_kind


def eastwest_network(ew: dict[str, dict]) -> str:
    """The network an east-west gateway is for; every field that carries it must agree."""
    tpl = ew["Deployment"]["spec"]["template"]
    [c] = tpl["spec"]["containers"]
    names = {
        "pod label": tpl["metadata"]["labels"][NETWORK_LABEL],
        "ISTIO_META_REQUESTED_NETWORK_VIEW": env_of(c)["ISTIO_META_REQUESTED_NETWORK_VIEW"],
        "Service label": ew["Service"]["metadata"]["labels"][NETWORK_LABEL],
    }
    assert len(set(names.values())) == 1, f"the east-west gateway names several networks: {names}"
    return names["pod label"]


def pod_labels_of(dep: dict) -> dict[str, str]:
    return dep["spec"]["template"]["metadata"]["labels"]


def test_eastwest_gateway_is_istios():
    """deploy/eastwest as Istio's gateway chart renders it with networkGateway (and
    gen-eastwest-gateway.sh --network generates it)."""
    ew = eastwest()
    dep, svc = ew["Deployment"], ew["Service"]
    tpl = dep["spec"]["template"]
    labels = pod_labels_of(dep)
    assert {k: labels.get(k) for k in ("istio", "app")} == {"istio": "eastwestgateway", "app": EASTWEST}
    assert labels[NETWORK_LABEL] == eastwest_network(ew) == "network1"
    assert selector_matches(dep["spec"]["selector"], labels)
    # A placeholder container that meshd's injector fills in with Istio's `gateway` template.
    assert labels["sidecar.istio.io/inject"] == "true"
    assert tpl["metadata"]["annotations"]["inject.istio.io/templates"] == "gateway"
    [c] = tpl["spec"]["containers"]
    assert (c["name"], c["image"]) == ("istio-proxy", "auto")
    assert not tpl["spec"].get("initContainers")
    # env/0 is what the overlays patch (behind a JSON patch `test`); ROUTER_MODE is obsolete (the
    # sni-dnat clusters come from the AUTO_PASSTHROUGH server).
    assert c["env"][0]["name"] == "ISTIO_META_REQUESTED_NETWORK_VIEW"
    assert "ISTIO_META_ROUTER_MODE" not in env_of(c)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1337 and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in tpl["spec"]["securityContext"]["sysctls"]
    # Replicas: the HPA's (the chart's autoscaling default).
    assert "replicas" not in dep["spec"]
    hpa = ew["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": EASTWEST}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 5)
    # Its own account, which may read the Secrets of istio-system and nothing else.
    assert tpl["spec"]["serviceAccountName"] == ew["ServiceAccount"]["metadata"]["name"] == EASTWEST
    assert ew["Role"]["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "watch", "list"]}]
    assert ew["RoleBinding"]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": EASTWEST}
    assert ew["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": EASTWEST, "namespace": "istio-system"}]
    # The Service: a LoadBalancer with the four network gateway ports under Istio's names.
    assert svc["spec"]["type"] == "LoadBalancer"
    assert {p["name"]: (p["port"], p["targetPort"], p.get("protocol", "TCP")) for p in svc["spec"]["ports"]} == {
        name: (port, port, "TCP") for name, port in EASTWEST_PORTS.items()}
    assert {k: svc["metadata"]["labels"].get(k) for k in ("istio", "app")} == {"istio": "eastwestgateway", "app": EASTWEST}
    assert svc["spec"]["selector"] and selector_matches({"matchLabels": svc["spec"]["selector"]}, labels)
    # Found as its network's gateway by the label, on the default port 15443 (no
    # networking.istio.io/gatewayPort label moving it).
    assert "networking.istio.io/gatewayPort" not in svc["metadata"]["labels"]


def test_the_two_clusters_are_on_different_networks():
    networks = [n for n, _, _ in CLUSTERS.values()]
    assert len(set(networks)) == len(networks) == 2


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_eastwest_overlay_sets_its_clusters_network(cluster):
    network, ew_dir, cluster_dir = CLUSTERS[cluster]
    ew = eastwest(ew_dir)
    assert eastwest_network(ew) == network
    # The overlay is the base with the network replaced, nothing else.
    base = eastwest()
    base_network = eastwest_network(base)
    swapped = json.loads(json.dumps(base).replace(json.dumps(base_network), json.dumps(network)))
    assert ew == swapped
    # The same network as the rest of that cluster's install.
    objects = render(DEPLOY / cluster_dir).objects
    ns = find(objects, "Namespace", "istio-system")
    assert ns["metadata"]["labels"][NETWORK_LABEL] == network
    if cluster == "cluster1":
        env = env_of(deployment_container(objects))
        assert (env["CLUSTER_ID"], env["MESHD_NETWORK"]) == (cluster, network)
    else:
        assert ns["metadata"]["annotations"]["topology.istio.io/controlPlaneClusters"] == "cluster1"
        cfg = find(objects, "MutatingWebhookConfiguration", "istio-sidecar-injector")
        _injection_hooks(cfg, f"/inject/cluster/{cluster}/net/{network}")


def _called_webhooks(cfg: dict, namespace: str, namespace_labels: dict, pod_labels: dict) -> list[tuple[str, str]]:
    """(name, path) of every webhook of `cfg` the API server calls for a new pod."""
    # The API server labels every namespace with its name.
    ns_labels = {**namespace_labels, "kubernetes.io/metadata.name": namespace}
    return [(h["name"], h["clientConfig"]["service"]["path"]) for h in cfg["webhooks"]
            if selector_matches(h.get("namespaceSelector"), ns_labels)
            and selector_matches(h.get("objectSelector"), pod_labels)]


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_injection_webhooks_select_the_eastwest_gateway_once(cluster):
    """The east-west gateway's pods, in istio-system (no injection label), reach meshd's injector
    exactly once, at the cluster's path; application pods as Istio's selectors send them; meshd's
    own pods never (they would need meshd to start)."""
    network, ew_dir, cluster_dir = CLUSTERS[cluster]
    objects = render(DEPLOY / cluster_dir).objects
    cfg = find(objects, "MutatingWebhookConfiguration", "istio-sidecar-injector")
    system_labels = find(objects, "Namespace", "istio-system")["metadata"].get("labels", {})
    path = "/inject" if cluster == "cluster1" else f"/inject/cluster/{cluster}/net/{network}"
    ns_hook, obj_hook = ("namespace.sidecar-injector.istio.io", path), ("object.sidecar-injector.istio.io", path)
    gateway_pod = pod_labels_of(eastwest(ew_dir)["Deployment"])
    assert _called_webhooks(cfg, "istio-system", system_labels, gateway_pod) == [obj_hook]
    enabled = {"istio-injection": "enabled"}
    assert _called_webhooks(cfg, "sample", enabled, {"app": "helloworld"}) == [ns_hook]
    assert _called_webhooks(cfg, "sample", enabled, {"app": "curl", "sidecar.istio.io/inject": "true"}) == [ns_hook]
    assert _called_webhooks(cfg, "sample", enabled, {"app": "x", "sidecar.istio.io/inject": "false"}) == []
    assert _called_webhooks(cfg, "default", {}, {"app": "x"}) == []
    assert _called_webhooks(cfg, "default", {}, {"app": "x", "sidecar.istio.io/inject": "true"}) == [obj_hook]
    assert _called_webhooks(cfg, "disabled", {"istio-injection": "disabled"}, {"sidecar.istio.io/inject": "true"}) == []
    primary = render(DEPLOY / "primary").objects
    meshd_pod = pod_labels_of(find(primary, "Deployment", "istiod"))
    for ns_labels in (system_labels, {**system_labels, **enabled}):
        assert _called_webhooks(cfg, "istio-system", ns_labels, meshd_pod) == []


def test_expose_istiod_is_istios_sample():
    """samples/multicluster/expose-istiod.yaml, field for field (networking.istio.io/v1)."""
    objects = render(DEPLOY / "expose-istiod").objects
    assert sorted(obj_id(o) for o in objects) == [
        ("networking.istio.io", "Gateway", "istio-system", "istiod-gateway"),
        ("networking.istio.io", "VirtualService", "istio-system", "istiod-vs"),
    ]
    gw, vs = find(objects, "Gateway", "istiod-gateway"), find(objects, "VirtualService", "istiod-vs")
    assert gw["apiVersion"] == vs["apiVersion"] == "networking.istio.io/v1"
    assert gw["spec"] == {
        "selector": {"istio": "eastwestgateway"},
        "servers": [
            {"port": {"name": "tls-istiod", "number": 15012, "protocol": "tls"},
             "tls": {"mode": "PASSTHROUGH"}, "hosts": ["*"]},
            {"port": {"name": "tls-istiodwebhook", "number": 15017, "protocol": "tls"},
             "tls": {"mode": "PASSTHROUGH"}, "hosts": ["*"]},
        ],
    }
    assert vs["spec"] == {
        "hosts": ["*"],
        "gateways": ["istiod-gateway"],
        "tls": [
            {"match": [{"port": 15012, "sniHosts": ["*"]}],
             "route": [{"destination": {"host": ISTIOD_HOST, "port": {"number": 15012}}}]},
            {"match": [{"port": 15017, "sniHosts": ["*"]}],
             "route": [{"destination": {"host": ISTIOD_HOST, "port": {"number": 443}}}]},
        ],
    }


def test_expose_istiod_ends_at_meshds_tls_listeners(primary):
    """Each PASSTHROUGH port ends at the meshd listener that serves it: the Gateway selects both
    networks' east-west gateways and listens on ports their Service exposes; the VirtualService
    binds to it and matches exactly its ports; its destinations are ports of Service istiod whose
    targets are meshd's TLS gRPC (15012) and webhook (15017) listeners, never plaintext 15010 or
    monitoring 15014."""
    objects = render(DEPLOY / "expose-istiod").objects
    gw, vs = find(objects, "Gateway", "istiod-gateway"), find(objects, "VirtualService", "istiod-vs")
    passthrough = {s["port"]["number"] for s in gw["spec"]["servers"] if s["tls"]["mode"] == "PASSTHROUGH"}
    assert passthrough == {15012, 15017}
    for _, ew_dir, _ in CLUSTERS.values():
        ew = eastwest(ew_dir)
        assert selector_matches({"matchLabels": gw["spec"]["selector"]}, pod_labels_of(ew["Deployment"]))
        exposed = {p["port"]: p["targetPort"] for p in ew["Service"]["spec"]["ports"]}
        assert all(exposed.get(port) == port for port in passthrough), exposed
    assert vs["metadata"]["namespace"] == gw["metadata"]["namespace"]
    assert vs["spec"]["gateways"] == [gw["metadata"]["name"]]
    istiod = find(primary, "Service", "istiod")
    assert ISTIOD_HOST == f"{istiod['metadata']['name']}.{istiod['metadata']['namespace']}.svc.{config_default('DOMAIN_SUFFIX')}"
    target_of = {p["port"]: p["targetPort"] for p in istiod["spec"]["ports"]}
    reached = {}
    for route in vs["spec"]["tls"]:
        [match], [dest] = route["match"], route["route"]
        assert dest["destination"]["host"] == ISTIOD_HOST
        reached[match["port"]] = target_of[dest["destination"]["port"]["number"]]
    assert reached == {15012: 15012, 15017: 15017}
    # Those are meshd's TLS listeners: the defaults, which the Deployment keeps.
    args = parse_args(deployment_container(primary)["args"])
    assert "grpc-addr" not in args and "webhook-addr" not in args
    assert config_default("MESHD_GRPC_ADDR").endswith(":15012")
    assert config_default("MESHD_WEBHOOK_ADDR").endswith(":15017")
    container_ports = {p["containerPort"]: p["name"] for p in deployment_container(primary)["ports"]}
    assert (container_ports[15012], container_ports[15017]) == ("https-dns", "https-webhook")


def test_expose_services_is_istios_sample():
    """samples/multicluster/expose-services.yaml (networking.istio.io/v1), on the port the
    east-west gateways of both networks expose as `tls`."""
    [gw] = render(DEPLOY / "expose-services").objects
    assert (gw["apiVersion"], gw["kind"]) == ("networking.istio.io/v1", "Gateway")
    assert gw["metadata"] == {"name": "cross-network-gateway", "namespace": "istio-system"}
    assert gw["spec"] == {
        "selector": {"istio": "eastwestgateway"},
        "servers": [{"port": {"number": 15443, "name": "tls", "protocol": "TLS"},
                     "tls": {"mode": "AUTO_PASSTHROUGH"}, "hosts": ["*.local"]}],
    }
    for _, ew_dir, _ in CLUSTERS.values():
        ew = eastwest(ew_dir)
        assert selector_matches({"matchLabels": gw["spec"]["selector"]}, pod_labels_of(ew["Deployment"]))
        [tls] = [p for p in ew["Service"]["spec"]["ports"] if p["name"] == "tls"]
        assert tls["port"] == tls["targetPort"] == gw["spec"]["servers"][0]["port"]["number"]
    # `*.local` covers every service of the mesh's DNS domain.
    assert fnmatch.fnmatch(f"helloworld.sample.svc.{config_default('DOMAIN_SUFFIX')}", "*.local")
    # Only the east-west gateways serve it: the Gateways of deploy/ select nothing else.
    for d in kustomization_dirs():
        for o in render(d).objects:
            if o["kind"] == "Gateway":
                assert o["spec"]["selector"] == {"istio": "eastwestgateway"}, obj_id(o)


def test_remote_endpointslice_fits_every_address_it_may_point_at(remote):
    """cluster2's istiod EndpointSlice (Istio's remote profile: 15012 and 15017) works with either
    address it may hold: cluster1's east-west gateway (tls-istiod, tls-webhook, both PASSTHROUGH
    in expose-istiod) or, on one network, istiod-lb."""
    eps = {p["name"]: p["port"] for p in find(remote, "EndpointSlice", "istiod-primary")["ports"]}
    assert eps == {"tcp-istiod": 15012, "tcp-webhook": 15017}
    ew = {p["name"]: p["port"] for p in eastwest(CLUSTERS["cluster1"][1])["Service"]["spec"]["ports"]}
    assert (ew["tls-istiod"], ew["tls-webhook"]) == (eps["tcp-istiod"], eps["tcp-webhook"])
    gw = find(render(DEPLOY / "expose-istiod").objects, "Gateway", "istiod-gateway")
    assert {s["port"]["number"] for s in gw["spec"]["servers"] if s["tls"]["mode"] == "PASSTHROUGH"} == set(eps.values())
    lb = find(render(DEPLOY / "istiod-lb").objects, "Service", "istiod-lb")
    assert {p["name"]: p["port"] for p in lb["spec"]["ports"]} == eps
    # The remote Service's ports have the slice's names (kube-proxy pairs them by name).
    svc = find(remote, "Service", "istiod")
    assert {p["name"] for p in svc["spec"]["ports"]} == set(eps)


def test_same_network_variant():
    """deploy/overlays/remote-same-network: cluster2 on the primary's network, pointing at
    istiod-lb; only the namespace label, the injection paths and the address differ from the base."""
    primary_network = find(render(DEPLOY / "overlays" / "primary-example").objects,
                           "Namespace", "istio-system")["metadata"]["labels"][NETWORK_LABEL]
    r = render(DEPLOY / "overlays" / "remote-same-network").objects
    assert find(r, "Namespace", "istio-system")["metadata"]["labels"][NETWORK_LABEL] == primary_network
    _injection_hooks(find(r, "MutatingWebhookConfiguration", "istio-sidecar-injector"),
                     f"/inject/cluster/cluster2/net/{primary_network}")
    assert find(r, "EndpointSlice", "istiod-primary")["endpoints"][0]["addresses"] == [EXAMPLE_LB_IP]
    base = {obj_id(o): o for o in render(DEPLOY / "remote").objects}
    assert set(base) == {obj_id(o) for o in r}
    assert sorted(o["kind"] for o in r if base[obj_id(o)] != o) == ["EndpointSlice", "MutatingWebhookConfiguration", "Namespace"]


# --------------------------------------------------------------------------------------------
# deploy/README.md: the commands refer to what exists, in the order of Istio's docs
# --------------------------------------------------------------------------------------------

README = DEPLOY / "README.md"


def readme_commands() -> list[str]:
    """The shell commands of deploy/README.md's ```sh blocks, continuations joined, comments
    dropped."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        buf = ""
        for raw in block.splitlines():
            line = re.sub(r"(^|\s+)#(\s.*)?$", "", raw).rstrip()
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            line = (buf + line).strip()
            buf = ""
            if line:
                out.append(line)
        assert not buf, "a ```sh block of deploy/README.md ends in a continuation"
    assert out
    return out


def _readme_copies(commands: list[str]) -> dict[str, str]:
    """`cp -r deploy/overlays/X deploy/overlays/Y` of the README: Y -> X (paths under deploy/)."""
    copies = {}
    for c in commands:
        for src, dst in re.findall(r"\bcp -r deploy/(\S+) deploy/(\S+)", c):
            assert (DEPLOY / src / "kustomization.yaml").is_file(), f"README copies a missing {src}"
            copies[dst.rstrip("/")] = src.rstrip("/")
    return copies


def test_readme_applies_existing_kustomizations_in_istios_order():
    """Every `apply -k` of deploy/README.md names a kustomization of deploy/ (or a copy the README
    makes of one), and the different-networks walk-through runs in the order of Istio's "Install
    Primary-Remote on different networks": cluster1's network label, the primary, cluster1's
    east-west gateway, expose-istiod, cluster2's namespace (annotation, network label), the remote
    pointing at cluster1's gateway, the remote secret, cluster2's east-west gateway,
    expose-services in cluster1, then the helloworld/curl verification in both clusters."""
    commands = readme_commands()
    copies = _readme_copies(commands)
    steps = []
    for c in commands:
        ctx = re.search(r'kubectl\b.*?--context="?\$\{?(CTX_CLUSTER\d)\}?"?', c)
        ctx = ctx.group(1) if ctx else None
        for target in re.findall(r"\bapply -k (\S+)", c):
            assert target.startswith("deploy/"), c
            rel = target[len("deploy/"):].rstrip("/")
            rel = copies.get(rel, rel)
            assert (DEPLOY / rel / "kustomization.yaml").is_file(), f"README applies {target}, not a kustomization"
            steps.append((ctx, rel))
        if re.search(rf"\blabel (--overwrite )?namespace istio-system {re.escape(NETWORK_LABEL)}=(\S+)", c):
            steps.append((ctx, "label " + c.rsplit("=", 1)[1]))
        if re.search(r"\bannotate (--overwrite )?namespace istio-system topology.istio.io/controlPlaneClusters=cluster1\b", c):
            steps.append((ctx, "annotate"))
        if "meshd create-remote-secret" in c:
            m = re.search(r'create-remote-secret\b.*--context[= ]"?\$\{?(CTX_CLUSTER\d)\}?"?.*--name cluster2\b.*\|\s*(.*)', c)
            assert m, f"create-remote-secret must read cluster2 and be applied to cluster1: {c}"
            applied = re.search(r'--context="?\$\{?(CTX_CLUSTER\d)\}?"?', m.group(2))
            assert m.group(1) == "CTX_CLUSTER2" and applied and applied.group(1) == "CTX_CLUSTER1", c
            steps.append(("CTX_CLUSTER1", "remote secret"))
        if "helloworld.yaml" in c:
            sel = re.search(r"-l (\S+)", c)
            steps.append((ctx, "helloworld " + (sel.group(1) if sel else "?")))
        if "curl -sS helloworld.sample:5000/hello" in c:
            steps.append((ctx, "call helloworld"))
    want = [
        ("CTX_CLUSTER1", "label network1"),
        ("CTX_CLUSTER1", "overlays/primary-example"),
        ("CTX_CLUSTER1", "overlays/eastwest-cluster1"),
        ("CTX_CLUSTER1", "expose-istiod"),
        ("CTX_CLUSTER2", "annotate"),
        ("CTX_CLUSTER2", "label network2"),
        ("CTX_CLUSTER2", "overlays/remote-example"),
        ("CTX_CLUSTER1", "remote secret"),
        ("CTX_CLUSTER2", "overlays/eastwest-cluster2"),
        ("CTX_CLUSTER1", "expose-services"),
        ("CTX_CLUSTER1", "helloworld service=helloworld"),
        ("CTX_CLUSTER2", "helloworld service=helloworld"),
        ("CTX_CLUSTER1", "helloworld version=v1"),
        ("CTX_CLUSTER2", "helloworld version=v2"),
        ("CTX_CLUSTER1", "call helloworld"),
        ("CTX_CLUSTER2", "call helloworld"),
    ]
    it = iter(steps)
    missing = [w for w in want if w not in it]  # `in` on an iterator consumes: an ordered subsequence
    assert not missing, f"deploy/README.md lacks, or has out of order, {missing}; its steps: {steps}"
    # expose-services only ever in cluster1; cluster2's plumbing only in cluster2.
    assert {ctx for ctx, s in steps if s == "expose-services"} == {"CTX_CLUSTER1"}
    assert {ctx for ctx, s in steps if s in ("overlays/remote-example", "overlays/eastwest-cluster2")} == {"CTX_CLUSTER2"}
    # Every deploy/ path the README mentions exists (or is a copy it makes).
    for path in set(re.findall(r"\bdeploy/([\w./-]*\w)", README.read_text())):
        made = any(path == d or path.startswith(d + "/") for d in copies)
        assert made or (DEPLOY / path).exists(), f"deploy/README.md mentions deploy/{path}, which does not exist"


def test_readme_copy_and_edit_commands_render(tmp_path):
    """The README's `cp -r` of an example overlay and `sed` of its example address, run on a copy
    of deploy/: every copy renders, with the substituted address and without the example one."""
    commands = readme_commands()
    work = tmp_path / "deploy"
    shutil.copytree(DEPLOY, work)
    values = {"DISCOVERY_ADDRESS": "198.51.100.7", "LB_IP": "198.51.100.8"}
    copies = _readme_copies(commands)
    assert copies, "the README makes no copy of an example overlay"
    for dst, src in copies.items():
        if not (work / dst).exists():
            shutil.copytree(work / src, work / dst)
    edited: dict[str, set[str]] = {}
    for c in commands:
        for expr, file in re.findall(r"\bsed -i \"(s/[^\"]+)\" deploy/(\S+)", c):
            _, old, new, flags = expr.split("/")
            assert flags in ("", "g"), expr
            var = re.fullmatch(r"\$\{?(\w+)\}?", new)
            assert var and var.group(1) in values, f"unknown substitution {new} in {c}"
            path = work / file
            assert path.is_file(), f"README edits a missing deploy/{file}"
            text = path.read_text()
            assert re.search(old, text), f"deploy/{file} has no {old} to replace"
            path.write_text(re.sub(old, values[var.group(1)], text))
            [copy_dir] = [d for d in copies if file.startswith(d + "/")]
            edited.setdefault(copy_dir, set()).add(values[var.group(1)])
    # Each copy exists to be given a real address.
    assert set(edited) == set(copies), (edited, copies)
    for d, vals in edited.items():
        rendered = json.dumps(render(work / d).objects)
        for v in vals:
            assert v in rendered, f"{d}: {v} did not reach the rendered objects"
        assert EXAMPLE_LB_IP not in rendered, f"{d}: still has the example address"


@pytest.fixture(scope="module")
def standalone_meshd(tmp_path_factory):
    m = start_meshd(tmp_path_factory.mktemp("webhook") / "data")
    try:
        ok = m.stderr.wait(lambda ls: "webhook" in parse_listeners(ls), time.monotonic() + START_TIMEOUT_S)
        assert ok, f"no webhook listener line\n{m.describe()}"
        m.addrs = parse_listeners(m.stderr.lines())
        yield m
    finally:
        m.stop()


class _IstiodHTTPS(http.client.HTTPSConnection):
    """HTTPS to a loopback port, verifying meshd's certificate as istiod.istio-system.svc."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext):
        super().__init__(host, port, timeout=15, context=ctx)
        self._verify_ctx = ctx

    def connect(self):
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._verify_ctx.wrap_socket(sock, server_hostname="istiod.istio-system.svc")


def admission_review(meshd, path: str, obj: dict, group: str, resource: str, namespace: str) -> dict:
    """POSTs one AdmissionReview (CREATE) to meshd's webhook listener; returns its response."""
    kind = {"group": group, "version": obj["apiVersion"].split("/")[-1], "kind": obj["kind"]}
    res = {"group": group, "version": kind["version"], "resource": resource}
    uid = f"test-{obj['kind'].lower()}-{time.monotonic_ns()}"
    body = {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": kind, "resource": res, "requestKind": kind, "requestResource": res,
                    "namespace": namespace, "operation": "CREATE", "userInfo": {"username": "admin"},
                    "object": obj, "oldObject": None, "dryRun": False,
                    "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}},
    }
    host, port = meshd.addrs["webhook"]
    conn = _IstiodHTTPS(host, port, ssl.create_default_context(cafile=str(meshd.root_cert_path)))
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode()
    finally:
        conn.close()
    assert r.status == 200, f"{path}: {r.status} {text}"
    reply = json.loads(text)
    assert reply["response"]["uid"] == uid
    return reply["response"]


def test_meshd_admits_the_istio_objects_of_deploy(standalone_meshd):
    """meshd's own /validate (the primary's istio-validator-istio-system) admits every Istio object
    of deploy/, and refuses a broken one (so the answer is not always yes)."""
    istio = [o for d in kustomization_dirs() for o in render(d).objects if group_of(o) == "networking.istio.io"]
    assert {o["metadata"]["name"] for o in istio} == {"istiod-gateway", "istiod-vs", "cross-network-gateway"}
    plural = {"Gateway": "gateways", "VirtualService": "virtualservices"}
    for o in istio:
        resp = admission_review(standalone_meshd, "/validate", o, "networking.istio.io", plural[o["kind"]], "istio-system")
        assert resp["allowed"] is True, f"{o['kind']}/{o['metadata']['name']}: {resp}"
    broken = copy.deepcopy(find(istio, "Gateway", "cross-network-gateway"))
    broken["spec"]["servers"][0]["tls"]["mode"] = "AUTO_PASSTHROUGHX"
    resp = admission_review(standalone_meshd, "/validate", broken, "networking.istio.io", "gateways", "istio-system")
    assert resp["allowed"] is False and "spec.servers[0].tls" in json.dumps(resp), resp


def test_meshd_injects_the_eastwest_gateway_pod(standalone_meshd):
    """The cluster2 gateway's pod template sent to meshd's /inject at cluster2's path, as the remote
    API server sends it through cluster1's east-west gateway: admitted, made a router by the
    `gateway` template (no istio-init), `auto` replaced by the proxy image, and the network
    settings reach the proxy (REQUESTED_NETWORK_VIEW kept, cluster and network from the path and
    the pod label)."""
    network, ew_dir, cluster_dir = CLUSTERS["cluster2"]
    [hook_path] = {h["clientConfig"]["service"]["path"] for h in
                   find(render(DEPLOY / cluster_dir).objects, "MutatingWebhookConfiguration", "istio-sidecar-injector")["webhooks"]}
    tpl = copy.deepcopy(eastwest(ew_dir)["Deployment"]["spec"]["template"])
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {**tpl["metadata"], "generateName": f"{EASTWEST}-5c8d6f9b7d-"}, "spec": tpl["spec"]}
    resp = admission_review(standalone_meshd, hook_path, pod, "", "pods", "istio-system")
    assert resp["allowed"] is True, resp
    assert resp.get("patchType") == "JSONPatch", resp
    injected = json6902(pod, json.loads(base64.b64decode(resp["patch"])))
    # The `gateway` template: the pod's own istio-proxy filled in as a router, no traffic capture.
    [proxy] = injected["spec"]["containers"]
    assert proxy["name"] == "istio-proxy" and proxy["args"][:2] == ["proxy", "router"], proxy.get("args")
    assert "istio-init" not in [c["name"] for c in injected["spec"].get("initContainers", [])]
    assert proxy["image"] != "auto" and proxy["image"] == config_default("MESHD_PROXY_IMAGE"), proxy["image"]
    env = env_of(proxy)
    assert env["ISTIO_META_REQUESTED_NETWORK_VIEW"] == network
    assert (env["ISTIO_META_CLUSTER_ID"], env["ISTIO_META_NETWORK"]) == ("cluster2", network)
    assert injected["metadata"]["labels"][NETWORK_LABEL] == network


# ============================================================================================
# Dockerfile and .dockerignore (static: no Docker engine on this machine)
# ============================================================================================


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]


def dockerfile_stages() -> list[Stage]:
    lines, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    assert not buf, "Dockerfile ends in a line continuation"
    stages: list[Stage] = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.match(r"^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", rest.strip(), re.I)
            assert m, f"bad FROM: {line}"
            stages.append(Stage(m.group(1), m.group(2), []))
        else:
            assert stages, f"{instr} before the first FROM"
            stages[-1].instructions.append((instr, rest.strip()))
    return stages


def test_dockerfile_builds_a_static_binary_into_a_minimal_nonroot_image(primary):
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    build, final = stages[0], stages[-1]
    # Builder: the Rust toolchain, at least the crate's rust-version.
    m = re.match(r"^rust:(\d+)\.(\d+)", build.base)
    assert m, build.base
    rv = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', (REPO_ROOT / "Cargo.toml").read_text(), re.M)
    assert (int(m.group(1)), int(m.group(2))) >= (int(rv.group(1)), int(rv.group(2)))
    args = {k: v for i, a in build.instructions if i == "ARG" for k, _, v in [a.partition("=")]}
    runs = " ".join(a for i, a in build.instructions if i == "RUN")
    runs = re.sub(r'"?\$\{?(\w+)\}?"?', lambda mm: args.get(mm.group(1), mm.group(0)), runs)
    target = "x86_64-unknown-linux-musl"
    assert f"rustup target add {target}" in runs
    assert "musl-tools" in runs
    cargo = re.search(r"cargo build ([^&]*)", runs)
    assert cargo, "no cargo build in the builder stage"
    cflags = cargo.group(1).split()
    for flag in ("--release", "--locked", "--target", target, "--bin", "meshd"):
        assert flag in cflags, f"cargo build lacks {flag}: {cargo.group(0)}"
    # Runtime: distroless static or scratch, the binary only, a non-root user.
    assert final.base.startswith("gcr.io/distroless/static") or final.base == "scratch", final.base
    copies = [a for i, a in final.instructions if i == "COPY"]
    assert copies and all(a.startswith(f"--from={build.name}") for a in copies), copies
    [user] = [a for i, a in final.instructions if i == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot checks it)"
    pod_sc = find(primary, "Deployment", "istiod")["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["runAsUser"] == int(uid)
    [entry] = [a for i, a in final.instructions if i == "ENTRYPOINT"]
    assert json.loads(entry) == ["/meshd"], "ENTRYPOINT in exec form"
    [cmd] = [a for i, a in final.instructions if i == "CMD"]
    assert json.loads(cmd) == ["serve"]
    exposed = {int(p.split("/")[0]) for i, a in final.instructions if i == "EXPOSE" for p in a.split()}
    assert exposed == {p["containerPort"] for p in deployment_container(primary)["ports"]}


def _ignored(path: str, patterns: list[str]) -> bool:
    out = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        pat = pat[2:] if pat.startswith("./") else pat
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or (pat.startswith("**/") and fnmatch.fnmatch(p.split("/")[-1], pat[3:]))
               for p in prefixes):
            out = not neg
    return out


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    patterns = [l.strip() for l in DOCKERIGNORE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    for needed in ("Cargo.toml", "Cargo.lock", "build.rs", "src/main.rs", "src/lib.rs",
                   "proto/istio/v1/auth/ca.proto", "benches/ca_sign.rs", "examples/fake_apiserver.rs"):
        assert (REPO_ROOT / needed).exists(), needed
        assert not _ignored(needed, patterns), f".dockerignore drops {needed}, which cargo build needs"
    for dropped in ("target/debug/meshd", ".git/HEAD", ".venv/bin/python", "tests/interop/.venv/x",
                    "tests/interop/gen/x.py", "meshd-data/root-cert.pem"):
        assert _ignored(dropped, patterns), f".dockerignore should drop {dropped}"


# ============================================================================================
# 3. On fake API servers
# ============================================================================================


def fake_apiserver_binary() -> Path:
    p = Path(os.environ.get("FAKE_APISERVER_BIN") or (MESHD_BIN.parent / "examples" / "fake_apiserver"))
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.fail(f"fake API server binary {p} is missing: run `cargo build --all-targets` or set FAKE_APISERVER_BIN")
    return p


#: kind -> (plural, namespaced), for the REST paths of what deploy/ contains.
PLURALS = {
    "Namespace": ("namespaces", False),
    "ServiceAccount": ("serviceaccounts", True),
    "Secret": ("secrets", True),
    "ConfigMap": ("configmaps", True),
    "Service": ("services", True),
    "EndpointSlice": ("endpointslices", True),
    "Deployment": ("deployments", True),
    "PodDisruptionBudget": ("poddisruptionbudgets", True),
    "HorizontalPodAutoscaler": ("horizontalpodautoscalers", True),
    "ClusterRole": ("clusterroles", False),
    "ClusterRoleBinding": ("clusterrolebindings", False),
    "Role": ("roles", True),
    "RoleBinding": ("rolebindings", True),
    "MutatingWebhookConfiguration": ("mutatingwebhookconfigurations", False),
    "ValidatingWebhookConfiguration": ("validatingwebhookconfigurations", False),
    "Gateway": ("gateways", True),
    "VirtualService": ("virtualservices", True),
}


def collection_path(obj: dict) -> str:
    assert obj["kind"] in PLURALS, f"add {obj['kind']} to PLURALS"
    plural, namespaced = PLURALS[obj["kind"]]
    base = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
    ns = obj["metadata"].get("namespace")
    assert bool(ns) == namespaced, f"{obj['kind']}/{obj['metadata']['name']}: namespace {ns!r}"
    return f"{base}/namespaces/{ns}/{plural}" if namespaced else f"{base}/{plural}"


def object_path(obj: dict) -> str:
    return f"{collection_path(obj)}/{obj['metadata']['name']}"


class Fake:
    """One examples/fake_apiserver process and REST calls to it."""

    def __init__(self, name: str, state_dir: Path):
        self.name = name
        self.state_dir = state_dir
        self.proc = subprocess.Popen(
            [str(fake_apiserver_binary()), "--bind", "127.0.0.1:0", "--cluster-name", name,
             "--state-dir", str(state_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, errors="replace", env=child_env(),
        )
        _ALL_PROCESSES.append(self.proc)
        self.stderr = _StderrCollector(self.proc.stderr)
        ok = self.stderr.wait(lambda ls: any("fake-apiserver listening" in l for l in ls), time.monotonic() + START_TIMEOUT_S)
        if not ok:
            self.stop()
            raise RuntimeError(f"fake API server {name} did not start:\n{self.stderr.text()}")
        self.url = (state_dir / "url").read_text().strip()
        self.admin_token = (state_dir / "admin-token").read_text().strip()
        self.kubeconfig_admin = state_dir / "kubeconfig-admin.yaml"
        ctx = ssl.create_default_context(cafile=str(state_dir / "ca.pem"))
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))

    def stop(self):
        _end_process(self.proc)
        self.stderr.join(10)

    def call(self, method: str, path: str, body=None, token: str | None = None,
             content_type: str = "application/json") -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with self._opener.open(req, timeout=15) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text) if text.strip() else None
        except ValueError:
            return status, text

    def ok(self, method: str, path: str, body=None, **kw):
        status, out = self.call(method, path, body, **kw)
        assert 200 <= status < 300, f"{self.name}: {method} {path} -> {status}: {out}"
        return out

    def control(self, path: str, body=None, method: str = "POST"):
        return self.ok(method, "/fake" + path, body)

    def apply(self, obj: dict) -> dict:
        """kubectl apply of one object: create, or replace what is there."""
        status, out = self.call("POST", collection_path(obj), obj)
        if status == 409:
            current = self.ok("GET", object_path(obj))
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            status, out = self.call("PUT", object_path(obj), obj)
        assert status in (200, 201), f"{self.name}: applying {obj['kind']}/{obj['metadata']['name']} -> {status}: {out}"
        return out

    def sync_rbac(self) -> dict[str, list[dict]]:
        """What kube-apiserver's RBAC authorizer does with the stored (Cluster)Roles and
        bindings, done here once: each subject is granted its roles' rules in the fake (scoped
        to the binding's namespace for RoleBindings). Returns the grants by subject."""
        rbac = "/apis/rbac.authorization.k8s.io/v1"
        croles = {r["metadata"]["name"]: r for r in self.ok("GET", f"{rbac}/clusterroles")["items"]}
        roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in self.ok("GET", f"{rbac}/roles")["items"]}
        grants: dict[str, list[dict]] = {}

        def rules_of(role: dict, namespace: str | None) -> list[dict]:
            out = []
            for r in role.get("rules", []):
                assert "nonResourceURLs" not in r
                g = {"verbs": r["verbs"], "apiGroups": r["apiGroups"], "resources": r["resources"],
                     "resourceNames": r.get("resourceNames", [])}
                if namespace:
                    g["namespaces"] = [namespace]
                out.append(g)
            return out

        bindings = [(b, None) for b in self.ok("GET", f"{rbac}/clusterrolebindings")["items"]]
        bindings += [(b, b["metadata"]["namespace"]) for b in self.ok("GET", f"{rbac}/rolebindings")["items"]]
        for b, ns in bindings:
            ref = b["roleRef"]
            role = croles[ref["name"]] if ref["kind"] == "ClusterRole" else roles[(ns, ref["name"])]
            for s in b.get("subjects", []):
                subject = f"system:serviceaccount:{s['namespace']}:{s['name']}" if s["kind"] == "ServiceAccount" else s["name"]
                grants.setdefault(subject, []).extend(rules_of(role, ns))
        for subject, rules in grants.items():
            self.control("/grant", {"subject": subject, "rules": rules})
        return grants


def contains(want, got, path="") -> list[str]:
    """Differences where `got` lacks or changes what `want` has (the server may add fields)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path}: {got!r} is not an object"]
        return [d for k, v in want.items() for d in (contains(v, got[k], f"{path}.{k}") if k in got else [f"{path}.{k}: missing"])]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: {got!r} != {want!r}"]
        return [d for i, (w, g) in enumerate(zip(want, got)) for d in contains(w, g, f"{path}[{i}]")]
    return [] if want == got else [f"{path}: {got!r} != {want!r}"]


def apply_and_read_back(fake: Fake, objects: list[dict]):
    for o in objects:
        fake.apply(o)
    for o in objects:
        got = fake.ok("GET", object_path(o))
        diff = contains(o, got)
        assert not diff, f"{fake.name}: {o['kind']}/{o['metadata']['name']} read back differently: {diff}"


def create_remote_secret(remote: Fake) -> tuple[str, dict, str]:
    """`meshd create-remote-secret` with the remote's admin kubeconfig (no --create-service-account:
    the applied manifests must already have the account). Returns the output, the Secret and
    the reader token inside its kubeconfig."""
    r = subprocess.run(
        [str(MESHD_BIN), "create-remote-secret", "--kubeconfig", str(remote.kubeconfig_admin),
         "--name", "cluster2", "--token-timeout", "30s"],
        capture_output=True, text=True, timeout=90, env=child_env(),
    )
    assert r.returncode == 0, f"create-remote-secret failed ({r.returncode}):\n{r.stderr}"
    [secret] = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert secret["metadata"]["name"] == "istio-remote-secret-cluster2"
    assert secret["metadata"]["labels"] == {"istio/multiCluster": "true"}
    kc = yaml.safe_load(secret["stringData"]["cluster2"])
    token = kc["users"][0]["user"]["token"]
    return r.stdout, secret, token


def token_review(fake: Fake, reviewer_token: str, token: str) -> dict:
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": ["istio-ca"]}}
    return fake.ok("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body, token=reviewer_token)


def check_access(fake: Fake, token: str, allowed: list, denied: list):
    """Each entry is (method, path[, body[, content type]]); allowed ones must answer 2xx,
    denied ones 403."""
    problems = []
    for cases, want_allowed in ((allowed, True), (denied, False)):
        for case in cases:
            method, path = case[0], case[1]
            body = case[2] if len(case) > 2 else None
            ctype = case[3] if len(case) > 3 else "application/json"
            status, out = fake.call(method, path, body, token=token, content_type=ctype)
            if want_allowed and not 200 <= status < 300:
                problems.append(f"expected allowed: {method} {path} -> {status}: {out}")
            if not want_allowed and status != 403:
                problems.append(f"expected 403: {method} {path} -> {status}: {out}")
    assert not problems, f"{fake.name}:\n" + "\n".join(problems)


def _cm(ns: str, name: str = "istio-ca-root-cert") -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns},
            "data": {"root-cert.pem": "x"}}


def _lease(ns: str) -> dict:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "istio-namespace-controller-election", "namespace": ns},
            "spec": {"holderIdentity": "test", "leaseDurationSeconds": 30}}


def _sar() -> dict:
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": "system:serviceaccount:istio-system:istio-ingressgateway",
                     "resourceAttributes": {"verb": "get", "resource": "secrets", "namespace": "default"}}}


def common_reads() -> list:
    return [
        ("GET", "/api/v1/services"),
        ("GET", "/api/v1/pods"),
        ("GET", "/api/v1/nodes"),
        ("GET", "/api/v1/namespaces"),
        ("GET", "/api/v1/namespaces?watch=true&fieldSelector=metadata.name%3Distio-system&timeoutSeconds=1"),
        ("GET", "/apis/discovery.k8s.io/v1/endpointslices"),
        ("GET", "/apis/discovery.k8s.io/v1/endpointslices?watch=true&timeoutSeconds=1"),
        ("GET", "/api/v1/secrets?fieldSelector=" + urllib.parse.quote("type!=kubernetes.io/service-account-token")),
        ("GET", "/api/v1/configmaps?fieldSelector=metadata.name%3Distio-ca-root-cert"),
        ("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", _sar()),
    ]


def test_remote_manifests_on_a_fake_apiserver(tmp_path):
    """The remote overlay applied over REST and read back; the reader account's token from
    `meshd create-remote-secret` can do what meshd does in a remote, and not more."""
    remote = Fake("cluster2", tmp_path / "cluster2")
    try:
        objects = render(DEPLOY / "overlays" / "remote-example").objects
        apply_and_read_back(remote, objects)
        eps = remote.ok("GET", "/apis/discovery.k8s.io/v1/namespaces/istio-system/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Distiod")
        assert [e["endpoints"][0]["addresses"] for e in eps["items"]] == [[EXAMPLE_LB_IP]]
        grants = remote.sync_rbac()
        assert set(grants) == {READER_USER}, grants
        _, _, token = create_remote_secret(remote)

        # A workload token, reviewed with the reader's token (what meshd does for the CA).
        workload = remote.control("/token", {"namespace": "default", "serviceAccount": "web", "audiences": ["istio-ca"]})["token"]
        review = token_review(remote, token, workload)
        assert review["status"]["authenticated"] is True, review
        assert review["status"]["user"]["username"] == "system:serviceaccount:default:web"

        # Another webhook configuration the reader may read but not change.
        remote.apply({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                      "metadata": {"name": "other-injector"}, "webhooks": []})
        hooks = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
        ca_bundle = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
        patch = [{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": ca_bundle}]
        jp = "application/json-patch+json"
        allowed = common_reads() + [
            ("POST", "/api/v1/namespaces/default/configmaps", _cm("default")),
            ("GET", "/api/v1/namespaces/default/configmaps/istio-ca-root-cert"),
            ("POST", "/apis/coordination.k8s.io/v1/namespaces/istio-system/leases", _lease("istio-system")),
            ("GET", "/apis/coordination.k8s.io/v1/namespaces/istio-system/leases/istio-namespace-controller-election"),
            ("PATCH", "/apis/coordination.k8s.io/v1/namespaces/istio-system/leases/istio-namespace-controller-election",
             {"spec": {"holderIdentity": "test-2"}}, "application/merge-patch+json"),
            ("GET", hooks),
            ("GET", f"{hooks}/istio-sidecar-injector"),
            ("PATCH", f"{hooks}/istio-sidecar-injector", patch, jp),
            ("GET", "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations?fieldSelector="
                    "metadata.name%3Distio-validator-istio-system&watch=true&timeoutSeconds=1"),
        ]
        denied = [
            ("PATCH", f"{hooks}/other-injector", [{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}], jp),
            ("DELETE", f"{hooks}/istio-sidecar-injector"),
            ("POST", "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
             {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration", "metadata": {"name": "x"}}),
            ("POST", "/api/v1/namespaces/istio-system/secrets",
             {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "namespace": "istio-system"}}),
            ("POST", "/api/v1/namespaces/default/pods",
             {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "namespace": "default"}}),
            ("DELETE", "/api/v1/namespaces/istio-system/services/istiod"),
            ("DELETE", "/api/v1/namespaces/default/configmaps/istio-ca-root-cert"),
            ("PATCH", "/api/v1/namespaces/istio-system", {"metadata": {"annotations": {"x": "y"}}}, "application/merge-patch+json"),
        ]
        check_access(remote, token, allowed, denied)
        # ConfigMaps: get + replace, as meshd repairs istio-ca-root-cert.
        cm = remote.ok("GET", "/api/v1/namespaces/default/configmaps/istio-ca-root-cert", token=token)
        cm["data"]["root-cert.pem"] = "y"
        remote.ok("PUT", "/api/v1/namespaces/default/configmaps/istio-ca-root-cert", cm, token=token)
        # get + replace of the webhook configuration, as meshd's caBundle job writes it.
        cfg = remote.ok("GET", f"{hooks}/istio-sidecar-injector", token=token)
        remote.ok("PUT", f"{hooks}/istio-sidecar-injector", cfg, token=token)
        # The patched webhook kept its path and gained the caBundle.
        hook = remote.ok("GET", f"{hooks}/istio-sidecar-injector")["webhooks"][0]["clientConfig"]
        assert hook["caBundle"] == ca_bundle
        assert hook["service"]["path"] == "/inject/cluster/cluster2/net/network2"
    finally:
        remote.stop()


def make_cacerts(directory: Path) -> bytes:
    """An Istio `cacerts` directory (root + intermediate CA, as tools/certs makes); returns the root PEM."""
    now = dt.datetime.now(dt.timezone.utc)

    def ca(subject: str, key, issuer_name, issuer_key, pathlen):
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshd test"),
                          x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        if issuer_key is not None:
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        return b.sign(issuer_key or key, hashes.SHA256()), name

    root_key = ec.generate_private_key(ec.SECP256R1())
    root, root_name = ca("Root CA", root_key, None, None, None)
    int_key = ec.generate_private_key(ec.SECP256R1())
    inter, _ = ca("Intermediate CA cluster1", int_key, root_name, root_key, 0)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    directory.mkdir(parents=True)
    (directory / "root-cert.pem").write_bytes(pem(root))
    (directory / "ca-cert.pem").write_bytes(pem(inter))
    (directory / "cert-chain.pem").write_bytes(pem(inter) + pem(root))
    key = directory / "ca-key.pem"
    key.write_bytes(int_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key.chmod(0o600)
    return pem(root)


def test_primary_remote_walkthrough_on_fake_apiservers(tmp_path):
    """deploy/README.md's walk-through on two fake clusters: the primary overlay, cluster1's
    east-west gateway, expose-istiod and expose-services applied to the primary, the remote
    overlay and cluster2's east-west gateway to the remote, the RBAC in force, the remote secret
    from `meshd create-remote-secret` applied to the primary, and meshd running as the `istiod`
    account with the Deployment's own arguments and environment: it reads the Istio objects, and
    once the load balancers give the east-west gateway Services an address, takes them as the
    gateways of network1 (cluster1) and network2 (cluster2) on 15443."""
    primary = Fake("cluster1", tmp_path / "cluster1")
    remote = Fake("cluster2", tmp_path / "cluster2")
    meshd = None
    try:
        # Different networks: meshd, cluster1's east-west gateway, expose-istiod and
        # expose-services in the primary; the remote plumbing and cluster2's gateway in the remote.
        p_objects = render(DEPLOY / "overlays" / "primary-example").objects
        apply_and_read_back(primary, p_objects)
        for d in (CLUSTERS["cluster1"][1], "expose-istiod", "expose-services"):
            apply_and_read_back(primary, render(DEPLOY / d).objects)
        for d in (CLUSTERS["cluster2"][2], CLUSTERS["cluster2"][1]):
            apply_and_read_back(remote, render(DEPLOY / d).objects)
        assert set(primary.sync_rbac()) == {ISTIOD_USER, EASTWEST_USER}
        assert set(remote.sync_rbac()) == {READER_USER, EASTWEST_USER}

        # The east-west gateways' accounts read Secrets of istio-system, and nothing more.
        for fake in (primary, remote):
            gw_token = fake.control("/token", {"namespace": "istio-system", "serviceAccount": EASTWEST})["token"]
            fake.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gw-cert", "namespace": "istio-system"}})
            check_access(fake, gw_token, allowed=[
                ("GET", "/api/v1/namespaces/istio-system/secrets"),
                ("GET", "/api/v1/namespaces/istio-system/secrets/gw-cert"),
                ("GET", "/api/v1/namespaces/istio-system/secrets?watch=true&timeoutSeconds=1"),
            ], denied=[
                ("GET", "/api/v1/namespaces/default/secrets"),
                ("GET", "/api/v1/secrets"),
                ("DELETE", "/api/v1/namespaces/istio-system/secrets/gw-cert"),
                ("POST", "/api/v1/namespaces/istio-system/secrets",
                 {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "namespace": "istio-system"}}),
                ("GET", "/api/v1/namespaces/istio-system/configmaps"),
                ("GET", "/apis/networking.istio.io/v1/gateways"),
            ])
            fake.ok("DELETE", "/api/v1/namespaces/istio-system/secrets/gw-cert")

        # What meshd may do in the primary with the istiod account, and not more.
        istiod_token = primary.control("/token", {"namespace": "istio-system", "serviceAccount": "istiod"})["token"]
        hooks = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
        vhooks = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
        jp = "application/json-patch+json"
        bundle = [{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": base64.b64encode(b"ca").decode()}]
        primary.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "other", "namespace": "istio-system"}})
        allowed = common_reads() + [
            ("GET", "/api/v1/namespaces/istio-system/secrets?labelSelector=istio%2FmultiCluster%3Dtrue&watch=true&timeoutSeconds=1"),
            ("POST", "/apis/authentication.k8s.io/v1/tokenreviews",
             {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": istiod_token}}),
            ("GET", "/apis/networking.istio.io/v1/gateways"),
            ("GET", "/apis/networking.istio.io/v1/virtualservices"),
            ("GET", "/apis/networking.istio.io/v1/destinationrules"),
            ("POST", "/api/v1/namespaces/default/configmaps", _cm("default")),
            ("POST", "/apis/coordination.k8s.io/v1/namespaces/istio-system/leases", _lease("istio-system")),
            ("PATCH", "/apis/coordination.k8s.io/v1/namespaces/istio-system/leases/istio-namespace-controller-election",
             {"spec": {"holderIdentity": "t2"}}, "application/merge-patch+json"),
            ("POST", "/api/v1/namespaces/istio-system/secrets",
             {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "istio-ca-secret", "namespace": "istio-system"}}),
            ("GET", "/api/v1/namespaces/istio-system/secrets/istio-ca-secret"),
            ("GET", hooks), ("GET", vhooks),
            ("PATCH", f"{hooks}/istio-sidecar-injector", bundle, jp),
            ("PATCH", f"{vhooks}/istio-validator-istio-system", bundle, jp),
        ]
        denied = [
            ("POST", "/apis/coordination.k8s.io/v1/namespaces/default/leases", _lease("default")),
            ("POST", "/api/v1/namespaces/default/secrets",
             {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "namespace": "default"}}),
            ("PUT", "/api/v1/namespaces/istio-system/secrets/other",
             {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "other", "namespace": "istio-system"}}),
            ("DELETE", "/api/v1/namespaces/istio-system/secrets/istio-ca-secret"),
            ("DELETE", "/api/v1/namespaces/default/pods/x"),
            ("POST", "/apis/networking.istio.io/v1/namespaces/default/virtualservices",
             {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "x", "namespace": "default"}}),
            ("DELETE", f"{hooks}/istio-sidecar-injector"),
            ("POST", hooks, {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                             "metadata": {"name": "x"}}),
        ]
        check_access(primary, istiod_token, allowed, denied)
        for path in ("/apis/coordination.k8s.io/v1/namespaces/istio-system/leases/istio-namespace-controller-election",
                     "/api/v1/namespaces/istio-system/secrets/istio-ca-secret",
                     "/api/v1/namespaces/default/configmaps/istio-ca-root-cert"):
            primary.ok("DELETE", path)  # leave the primary as a fresh install for meshd

        # Step 4: the remote secret, applied to the primary.
        _, secret, _ = create_remote_secret(remote)
        primary.apply(secret)

        # meshd as the istiod account, with the Deployment's arguments and environment; container
        # paths become temporary directories, listeners ephemeral loopback ports (start_meshd).
        kubeconfig = tmp_path / "istiod-kubeconfig.yaml"
        kubeconfig.write_text(primary.control(f"/kubeconfig?token={urllib.parse.quote(istiod_token)}", method="GET"))
        root_pem = make_cacerts(tmp_path / "cacerts")
        c = deployment_container(p_objects)
        args = parse_args(c["args"])
        assert args.pop("ca-dir") == "/etc/cacerts"
        args.pop("data-dir")
        args.pop("log-format")  # the harness reads text logs
        # The environment as flags (the harness keeps meshd's variables out of its children);
        # the downward-API values as the kubelet would fill them.
        _, env_flags = serve_flags_and_env()
        env = {k: v for k, v in env_of(c).items() if isinstance(v, str)}
        env.update(POD_NAME="istiod-0", POD_NAMESPACE="istio-system")
        extra = [f"--{k}={v}" for k, v in args.items()]
        extra += [f"--{env_flags[k]}={v}" for k, v in env.items()]
        # start_meshd binds every listener, the webhook one included, to 127.0.0.1:0.
        extra += [f"--ca-dir={tmp_path / 'cacerts'}", f"--kubeconfig={kubeconfig}", "--remote-cluster-timeout=20s"]
        meshd = start_meshd(tmp_path / "data", *extra)
        assert meshd.root_pem.strip() == root_pem.strip(), "meshd did not use the plugged cacerts"

        def clusters():
            status, body = meshd.http_get("monitoring", "/debug/clusterz")
            assert status == 200, body
            rows = {r["id"]: r for r in json.loads(body)}
            return rows if set(rows) == {"cluster1", "cluster2"} and all(r["synced"] and not r["error"] for r in rows.values()) else None

        wait_until("cluster1 and cluster2 synced without errors in /debug/clusterz", CONVERGE_TIMEOUT_S, clusters,
                   lambda: meshd.http_get("monitoring", "/debug/clusterz")[1] + "\n" + meshd.stderr.text()[-4000:])

        # meshd reads expose-istiod and expose-services from the primary (with the istiod
        # account's RBAC) and the east-west gateway Services of both clusters.
        def registry():
            status, body = meshd.http_get("monitoring", "/debug/registryz")
            assert status == 200, body
            dump = json.loads(body)
            config = {k: set(v) for k, v in dump["config"].items()}
            ew = [svc for svc in dump["services"] if svc["hostname"] == f"{EASTWEST}.istio-system.svc.cluster.local"]
            return (config["gateways"] >= {"istio-system/istiod-gateway", "istio-system/cross-network-gateway"}
                    and config["virtualServices"] >= {"istio-system/istiod-vs"}
                    and len(ew) == 1 and ew[0]["defined"]
                    and {p["name"]: p["port"] for p in ew[0]["ports"]} == EASTWEST_PORTS)

        wait_until("the Istio objects and the east-west gateway Service in /debug/registryz", CONVERGE_TIMEOUT_S, registry,
                   lambda: meshd.http_get("monitoring", "/debug/registryz")[1][:4000] + "\n" + meshd.stderr.text()[-4000:])

        # The load balancers give both east-west gateways an address (what a cloud controller
        # writes into the status); meshd then has one gateway per network, on 15443, at that
        # address: its network from the Service label, its cluster from where it was found.
        gw_ips = {"cluster1": EXAMPLE_LB_IP, "cluster2": "203.0.113.20"}
        for fake, name in ((primary, "cluster1"), (remote, "cluster2")):
            fake.ok("PATCH", f"/api/v1/namespaces/istio-system/services/{EASTWEST}/status",
                    {"status": {"loadBalancer": {"ingress": [{"ip": gw_ips[name]}]}}},
                    content_type="application/merge-patch+json")

        def network_gateways():
            status, body = meshd.http_get("monitoring", "/debug/networkz")
            assert status == 200, body
            dump = json.loads(body)
            got = {(g["network"], g["cluster"], g["port"], g["address"], tuple(g["resolved"]), g["problem"])
                   for g in dump["gateways"]}
            want = {(CLUSTERS[c][0], c, EASTWEST_PORTS["tls"], ip, (ip,), None) for c, ip in gw_ips.items()}
            return dump["multiNetwork"] is True and got == want

        wait_until("both east-west gateways in /debug/networkz", CONVERGE_TIMEOUT_S, network_gateways,
                   lambda: meshd.http_get("monitoring", "/debug/networkz")[1][:4000] + "\n" + meshd.stderr.text()[-4000:])

        def root_cm(fake: Fake, ns: str):
            status, cm = fake.call("GET", f"/api/v1/namespaces/{ns}/configmaps/istio-ca-root-cert")
            return status == 200 and cm["data"]["root-cert.pem"].strip() == root_pem.decode().strip()

        for fake in (primary, remote):
            for ns in ("default", "istio-system"):
                wait_until(f"istio-ca-root-cert with the plugged root in {fake.name}/{ns}", CONVERGE_TIMEOUT_S,
                           lambda: root_cm(fake, ns), lambda: meshd.stderr.text()[-4000:])

        # The webhooks' caBundle, kept by meshd in both clusters (the names deploy/ uses are the
        # ones meshd patches; the RBAC lets it), replacing the dummy written above in the primary.
        def ca_bundle(fake: Fake, kind: str, name: str):
            status, cfg = fake.call("GET", f"/apis/admissionregistration.k8s.io/v1/{kind}/{name}")
            assert status == 200, cfg
            bundles = {base64.b64decode(w["clientConfig"].get("caBundle", "")).strip() for w in cfg["webhooks"]}
            return bundles == {root_pem.strip()}

        for fake, kind, name in ((primary, "mutatingwebhookconfigurations", "istio-sidecar-injector"),
                                 (primary, "validatingwebhookconfigurations", "istio-validator-istio-system"),
                                 (remote, "mutatingwebhookconfigurations", "istio-sidecar-injector")):
            wait_until(f"caBundle of {fake.name} {kind}/{name} = the mesh root", CONVERGE_TIMEOUT_S,
                       lambda: ca_bundle(fake, kind, name), lambda: meshd.stderr.text()[-4000:])
        path = remote.ok("GET", f"{hooks}/istio-sidecar-injector")["webhooks"][0]["clientConfig"]["service"]["path"]
        assert path == "/inject/cluster/cluster2/net/network2"

        # A remote workload's certificate: its token is reviewed by cluster2 with the reader account.
        tok = remote.control("/token", {"namespace": "default", "serviceAccount": "web", "audiences": ["istio-ca"]})["token"]
        (tmp_path / "web.jwt").write_text(tok)
        r = subprocess.run(
            [str(MESHD_BIN), "cert", "--addr", meshd.tls_target, "--root-cert", str(meshd.root_cert_path),
             "--token", str(tmp_path / "web.jwt"), "--cluster-id", "cluster2", "--key-type", "ecdsa-p256",
             "--out", str(tmp_path / "web-certs")],
            capture_output=True, text=True, timeout=60, env=child_env(),
        )
        assert r.returncode == 0, f"meshd cert for a cluster2 workload failed:\n{r.stdout}\n{r.stderr}\n{meshd.describe()[-4000:]}"
        assert "spiffe://cluster.local/ns/default/sa/web" in r.stdout + r.stderr
        leaf = x509.load_pem_x509_certificates((tmp_path / "web-certs" / "cert-chain.pem").read_bytes())[0]
        assert leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Intermediate CA cluster1"

        forbidden = [l for l in meshd.stderr.lines() if re.search(r"is forbidden: User|code: 403|\b403 Forbidden\b", l)]
        assert not forbidden, "meshd was refused by the RBAC of deploy/:\n" + "\n".join(forbidden[:20])
    finally:
        if meshd is not None:
            meshd.stop()
        remote.stop()
        primary.stop()
