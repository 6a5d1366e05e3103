"""Pods as Linux network namespaces, networks as bridges, and istio-init's traffic capture.

A ``NetLab`` (conftest fixture ``netlab``, one per test) creates:

- **networks**: a Linux bridge per network in the root namespace, holding the ``.1`` address
  of the network's own /24, so this process and what it starts in the root namespace (meshd,
  fake API servers) reach every pod, and pods reach the root namespace at their network's
  ``.1``. The root namespace does not forward (``net.ipv4.ip_forward`` is left as it is, 0 on
  the test machines), so networks are isolated from each other;
- **pods**: a network namespace each, attached by a veth pair to one or more networks
  (``eth0`` on the first: the pod IP; ``eth1``… on the others, e.g. an east-west gateway's
  "LoadBalancer IP"). Pods get **no default route**: a pod reaches only the subnets it is
  attached to, plus a route for the service CIDR (``SERVICE_CIDR``) on ``eth0`` so that a
  connection to a cluster IP gets past routing to the nat OUTPUT chain, where the capture
  redirects it (in Kubernetes the pod's default route plays that part);
- **capture** (``Pod.capture()``): the nat rules istio-init writes (Istio's
  tools/istio-iptables, REDIRECT mode), so a sidecar Envoy running as uid/gid 1337 gets the
  pod's inbound TCP on 15006 and its outbound TCP on 15001;
- **apps and clients in pods**: ``Pod.start_app()`` (an HTTP server on the pod IP answering
  with its name, tests/interop/pod_tools.py) and ``Pod.http_get()`` (a request made from inside
  the pod, so it goes through the pod's capture).

Names are unique per run: every object is named ``mshd<pid>…``. Objects left by an earlier run
that crashed (its pid gone, or equal to ours) are removed before the first lab of a run is
made. ``NetLab.close()`` ends every process the lab started, then deletes the namespaces (and
so the veths and the iptables rules in them) and the bridges, whatever happened before.

Everything here needs root (``ip netns``, ``iptables``); without it, or without the tools, the
``netlab`` fixture fails the test with the reason (a skip would be a failure anyway).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pytest

from conftest import _ALL_PROCESSES, _end_process, _StderrCollector, child_env

#: The uid and gid istio-proxy runs as (istio-init's -u / -g); the capture lets their traffic by.
PROXY_UID = 1337
PROXY_GID = 1337
#: Envoy's capture ports (istio-init's -p and -z).
OUTBOUND_CAPTURE_PORT = 15001
INBOUND_CAPTURE_PORT = 15006
#: The inbound ports the injector excludes (-d): Envoy's Prometheus port, the agent's health and
#: status ports. 15008 (HBONE) is excluded by istio-iptables itself.
DEFAULT_EXCLUDED_INBOUND_PORTS = (15090, 15021, 15020)
#: Cluster IPs live here; pods route it to eth0 (see the module doc).
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")
#: Network subnets (/24 each) come from this pool, skipping any range the root namespace routes.
NETWORK_POOL = ipaddress.ip_network("10.200.0.0/13")
#: Where meshd must listen for pods to reach it (each pod dials its first network's .1).
MESHD_HOST_FOR_PODS = "0.0.0.0"

PREFIX = "mshd"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)[-bv]")
_SEQ = itertools.count(1)
_CLEANED = False
_POD_TOOLS = Path(__file__).resolve().parent / "pod_tools.py"

#: How long a pod's app may take to listen, and one request from a pod.
APP_START_TIMEOUT_S = 30.0


class NetnsError(RuntimeError):
    pass


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout, env=child_env())
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def _tag() -> str:
    return f"{PREFIX}{os.getpid()}"


def _short(n: int) -> str:
    return format(n, "x")


# --------------------------------------------------------------------------------------------
# Preconditions and leftovers
# --------------------------------------------------------------------------------------------


def require_support() -> None:
    """Fails the calling test (never skips) when this machine cannot run pods: not root, or
    ip / iptables-restore / setpriv missing."""
    if os.geteuid() != 0:
        pytest.fail(
            f"the sidecar harness (tests/interop/netns.py) needs root for `ip netns` and iptables; "
            f"running as uid {os.geteuid()}"
        )
    missing = [t for t in ("ip", "iptables", "iptables-restore", "iptables-save", "setpriv") if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"the sidecar harness needs {', '.join(missing)} on PATH "
            "(Debian: apt-get install -y iproute2 iptables util-linux; scripts/test.sh installs them as root)"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(name: str) -> bool:
    m = _NAME_RE.match(name)
    if not m:
        return False
    pid = int(m.group(1))
    return pid == os.getpid() or not _alive(pid)


def _kill_netns_pids(ns: str) -> None:
    r = _run(["ip", "netns", "pids", ns], check=False)
    for tok in r.stdout.split():
        if tok.isdigit():
            try:
                os.kill(int(tok), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _netns_names() -> list[str]:
    r = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _link_names() -> list[str]:
    r = _run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in r.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def clean_leftovers() -> list[str]:
    """Removes namespaces, links and runtime dirs of earlier runs that are gone (pid not alive,
    or our own pid reused). Returns what it removed."""
    removed = []
    for ns in _netns_names():
        if _stale(ns):
            _kill_netns_pids(ns)
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(f"netns {ns}")
    for link in _link_names():
        if _stale(link):
            _run(["ip", "link", "del", link], check=False)
            removed.append(f"link {link}")
    for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}*.*"):
        if d.is_dir() and _stale(d.name.replace(".", "-", 1)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(f"dir {d}")
    return removed


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 range the root namespace has an address or a route in (default routes aside)."""
    nets = []
    for argv in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        for line in _run(argv, check=False).stdout.splitlines():
            for tok in line.split():
                if re.fullmatch(r"\d+\.\d+\.\d+\.\d+(/\d+)?", tok):
                    try:
                        n = ipaddress.ip_network(tok, strict=False)
                    except ValueError:
                        continue
                    if n.prefixlen > 0:
                        nets.append(n)
    return nets


_SUBNET_LOCK = threading.Lock()


def _allocate_subnet() -> ipaddress.IPv4Network:
    """A /24 from NETWORK_POOL that overlaps nothing the root namespace has, starting at an
    offset from our pid so that parallel runs start apart."""
    with _SUBNET_LOCK:
        used = _routed_networks()
        subnets = list(NETWORK_POOL.subnets(new_prefix=24))
        start = os.getpid() % len(subnets)
        for i in range(len(subnets)):
            cand = subnets[(start + i) % len(subnets)]
            if not any(cand.overlaps(u) for u in used) and not cand.overlaps(SERVICE_CIDR):
                return cand
    raise NetnsError(f"no free /24 left in {NETWORK_POOL}")


# --------------------------------------------------------------------------------------------
# Networks and pods
# --------------------------------------------------------------------------------------------


@dataclass
class Network:
    """A bridge in the root namespace; its .1 is the root namespace's address on the network."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    _next: int = 10

    @property
    def gateway(self) -> str:
        """The root namespace's address on this network (meshd and the test process)."""
        return str(self.subnet.network_address + 1)

    def allocate(self) -> str:
        if self._next >= self.subnet.num_addresses - 1:
            raise NetnsError(f"network {self.name} ({self.subnet}) has no address left")
        ip = str(self.subnet.network_address + self._next)
        self._next += 1
        return ip


@dataclass
class Attachment:
    network: Network
    iface: str
    veth: str
    ips: list[str]


@dataclass
class HttpResult:
    status: int
    body: str
    headers: dict[str, str]

    def json(self):
        return json.loads(self.body)


@dataclass
class PodApp:
    """An HTTP server in a pod (pod_tools.py serve)."""

    pod: "Pod"
    name: str
    ip: str
    port: int
    proc: subprocess.Popen
    stdout: _StderrCollector
    stderr: _StderrCollector

    def stop(self):
        _end_process(self.proc)
        self.stdout.join(10)
        self.stderr.join(10)

    def describe(self) -> str:
        return f"--- app {self.name} in {self.pod.name} ---\n{self.stderr.text()[-3000:]}"


@dataclass
class Pod:
    """A pod: a network namespace attached to one or more networks."""

    lab: "NetLab"
    name: str
    namespace: str
    netns: str
    service_account: str
    labels: dict[str, str]
    dir: Path
    attachments: list[Attachment] = field(default_factory=list)
    captured: bool = False
    sidecar: object = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def ip(self) -> str:
        """The pod IP (Kubernetes status.podIP): the first address on eth0."""
        return self.attachments[0].ips[0]

    @property
    def network(self) -> Network:
        """The pod's own network (eth0's)."""
        return self.attachments[0].network

    @property
    def addresses(self) -> list[str]:
        return [ip for a in self.attachments for ip in a.ips]

    def ip_on(self, network: Network) -> str:
        for a in self.attachments:
            if a.network is network:
                return a.ips[0]
        raise KeyError(f"pod {self.name} is not on network {network.name}")

    def add_address(self, network: Network) -> str:
        """One more address from `network` on the pod's interface there (e.g. a LoadBalancer IP)."""
        for a in self.attachments:
            if a.network is network:
                ip = network.allocate()
                _run(["ip", "-n", self.netns, "addr", "add", f"{ip}/{network.subnet.prefixlen}", "dev", a.iface])
                a.ips.append(ip)
                return ip
        raise KeyError(f"pod {self.name} is not on network {network.name}")

    # -- running things inside ---------------------------------------------------------------
    def cmd(self, *argv: str, as_proxy: bool = False) -> list[str]:
        """argv run inside the pod's network namespace; `as_proxy` as uid/gid 1337 (istio-proxy)."""
        pre = ["ip", "netns", "exec", self.netns]
        if as_proxy:
            pre += ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_GID}", "--clear-groups", "--"]
        return pre + [str(a) for a in argv]

    def run(self, *argv: str, as_proxy: bool = False, input: str | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess:
        return _run(self.cmd(*argv, as_proxy=as_proxy), input=input, timeout=timeout, check=check)

    def popen(self, *argv: str, as_proxy: bool = False) -> tuple[subprocess.Popen, _StderrCollector, _StderrCollector]:
        """A long-running process in the pod, ended by the lab's close(); returns it with
        collectors draining its stdout and stderr."""
        proc = subprocess.Popen(
            self.cmd(*argv, as_proxy=as_proxy),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=child_env(),
        )
        _ALL_PROCESSES.append(proc)
        out, err = _StderrCollector(proc.stdout), _StderrCollector(proc.stderr)
        self.lab.on_close(lambda: (_end_process(proc), out.join(10), err.join(10)))
        return proc, out, err

    # -- capture -----------------------------------------------------------------------------
    def capture(self, **opts) -> str:
        """Installs istio-init's nat rules in the pod (see istio_iptables_rules for the options)
        with `iptables-restore --noflush`, as istio-init does. Returns the rules."""
        rules = istio_iptables_rules(**opts)
        self.run("iptables-restore", "--noflush", input=rules)
        self.captured = True
        return rules

    def iptables_save(self) -> str:
        return self.run("iptables-save", "-t", "nat").stdout

    # -- apps and clients --------------------------------------------------------------------
    def start_app(self, port: int, name: str | None = None, ip: str | None = None) -> PodApp:
        """An HTTP server on ip:port (default: the pod IP) inside the pod, answering GET with its
        name (`name`, default the pod's name); GET /echo answers JSON with the caller's address
        and the request headers. Runs as root, so a captured pod's sidecar sees its traffic."""
        name = name or self.name
        ip = ip or self.ip
        proc, out, err = self.popen(sys.executable, str(_POD_TOOLS), "serve", name, ip, str(port))
        app = PodApp(pod=self, name=name, ip=ip, port=port, proc=proc, stdout=out, stderr=err)
        ok = out.wait(lambda lines: any('"ready"' in l for l in lines), time.monotonic() + APP_START_TIMEOUT_S)
        if not ok:
            state = f"exited with {proc.poll()}" if proc.poll() is not None else "still running"
            raise NetnsError(f"app {name} in pod {self.name} did not listen on {ip}:{port} ({state})\n{err.text()}")
        return app

    def http_get(self, url: str, *, headers: dict[str, str] | None = None, resolve: dict[str, str] | None = None,
                 timeout: float = 5.0) -> HttpResult:
        """GET `url` from inside the pod (a root process, so the capture applies). Host names are
        resolved through `resolve` and then the lab's `dns` (there is no DNS server); the Host
        header keeps the name. Raises OSError-like NetnsError on a connection failure."""
        return self.http_get_many(url, 1, headers=headers, resolve=resolve, timeout=timeout)[0]

    def http_get_many(self, url: str, n: int, *, headers: dict[str, str] | None = None,
                      resolve: dict[str, str] | None = None, timeout: float = 5.0) -> list[HttpResult]:
        """n GETs of `url` from inside the pod, each on a new connection (one process)."""
        req = {
            "url": url,
            "n": n,
            "headers": headers or {},
            "resolve": {**self.lab.dns, **(resolve or {})},
            "timeout": timeout,
        }
        r = self.run(sys.executable, str(_POD_TOOLS), "get", json.dumps(req), timeout=timeout * n + 30, check=False)
        if r.returncode != 0:
            raise NetnsError(f"GET {url} from pod {self.name} failed ({r.returncode}): {r.stderr.strip()}")
        out = []
        for item in json.loads(r.stdout):
            if "error" in item:
                raise NetnsError(f"GET {url} from pod {self.name}: {item['error']}")
            out.append(HttpResult(status=item["status"], body=item["body"], headers=item["headers"]))
        return out

    def sample(self, url: str, n: int, **kw) -> dict[str, int]:
        """Bodies of n GETs from the pod, counted ("HTTP <status>" for non-200 answers)."""
        counts: dict[str, int] = {}
        for res in self.http_get_many(url, n, **kw):
            key = res.body if res.status == 200 else f"HTTP {res.status}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    # -- sidecar -----------------------------------------------------------------------------
    def start_sidecar(self, meshd, **kw):
        """istio-agent (certificate + SDS) and Envoy for this pod: see sidecar.start_sidecar."""
        from sidecar import start_sidecar

        return start_sidecar(self, meshd, **kw)

    def start_gateway(self, meshd, **kw):
        """istio-agent and a gateway Envoy (node type router) in this pod: sidecar.start_sidecar
        with proxy_type="router"."""
        from sidecar import start_sidecar

        return start_sidecar(self, meshd, proxy_type="router", **kw)


class NetLab:
    """The networks and pods of one test; close() removes them all."""

    def __init__(self):
        global _CLEANED
        require_support()
        if not _CLEANED:
            clean_leftovers()
            _CLEANED = True
        self.tag = f"{_tag()}-{_short(next(_SEQ))}"
        self.networks: dict[str, Network] = {}
        self.pods: dict[str, Pod] = {}
        #: Host name → IP, used by Pod.http_get (there is no DNS server): fill with service names.
        self.dns: dict[str, str] = {}
        self._bridges: list[str] = []
        self._netns: list[str] = []
        self._closers: list[Callable[[], object]] = []
        # Short (sun_path is 108 bytes) and traversable by uid 1337: pytest's tmp dirs are 0700.
        self.dir = Path(tempfile.mkdtemp(prefix=f"{_tag()}.", dir=tempfile.gettempdir()))
        os.chmod(self.dir, 0o755)
        self._proxy_bins: dict[Path, Path] = {}

    # -- building ----------------------------------------------------------------------------
    def network(self, name: str) -> Network:
        """A new network (bridge + /24) named `name` (the Istio network name, e.g. "network1")."""
        if name in self.networks:
            raise ValueError(f"network {name} exists")
        bridge = f"{_tag()}b{_short(next(_SEQ))}"
        subnet = _allocate_subnet()
        net = Network(name=name, bridge=bridge, subnet=subnet)
        _run(["ip", "link", "add", bridge, "type", "bridge", "forward_delay", "0"])
        self._bridges.append(bridge)
        _run(["ip", "addr", "add", f"{net.gateway}/{subnet.prefixlen}", "dev", bridge])
        _run(["ip", "link", "set", bridge, "up"])
        self.networks[name] = net
        return net

    def pod(self, name: str, *, networks: Sequence[Network], namespace: str = "default",
            service_account: str | None = None, labels: dict[str, str] | None = None) -> Pod:
        """A pod named `name` in Kubernetes namespace `namespace`, attached to `networks` (eth0 on
        the first: its pod IP). Service account defaults to the pod name up to its last "-"
        (web-0 → web), labels to {"app": <that>}."""
        if not networks:
            raise ValueError("a pod needs at least one network")
        if name in self.pods:
            raise ValueError(f"pod {name} exists")
        base = name.rsplit("-", 1)[0] if "-" in name else name
        ns = f"{self.tag}-{name}"
        _run(["ip", "netns", "add", ns])
        self._netns.append(ns)
        pdir = self.dir / _short(next(_SEQ))
        pdir.mkdir()
        os.chown(pdir, PROXY_UID, PROXY_GID)
        os.chmod(pdir, 0o750)
        pod = Pod(lab=self, name=name, namespace=namespace, netns=ns,
                  service_account=service_account or base, labels=dict(labels or {"app": base}), dir=pdir)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for i, net in enumerate(networks):
            iface = f"eth{i}"
            veth = f"{_tag()}v{_short(next(_SEQ))}"
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", iface, "netns", ns])
            _run(["ip", "link", "set", veth, "master", net.bridge, "up"])
            ip = net.allocate()
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/{net.subnet.prefixlen}", "dev", iface])
            _run(["ip", "-n", ns, "link", "set", iface, "up"])
            pod.attachments.append(Attachment(network=net, iface=iface, veth=veth, ips=[ip]))
        _run(["ip", "-n", ns, "route", "add", str(SERVICE_CIDR), "dev", "eth0"])
        self.pods[name] = pod
        return pod

    def on_close(self, fn: Callable[[], object]) -> None:
        """Runs fn at close(), before the namespaces go (last registered, first run)."""
        self._closers.append(fn)

    def proxy_binary(self, path: Path) -> Path:
        """`path` if uid 1337 can run it, else a copy in the lab's dir that it can."""
        path = Path(path)
        if path in self._proxy_bins:
            return self._proxy_bins[path]
        r = _run(["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_GID}", "--clear-groups", "--",
                  "test", "-x", str(path)], check=False)
        if r.returncode == 0:
            out = path
        else:
            bindir = self.dir / "bin"
            bindir.mkdir(exist_ok=True)
            out = bindir / path.name
            shutil.copy2(path, out)
            os.chmod(out, 0o755)
        self._proxy_bins[path] = out
        return out

    # -- teardown ----------------------------------------------------------------------------
    def close(self):
        errors: list[BaseException] = []
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception as e:  # keep going: everything must go
                errors.append(e)
        self._closers.clear()
        for ns in reversed(self._netns):
            _kill_netns_pids(ns)  # anything started in the pod that is still there
            r = _run(["ip", "netns", "del", ns], check=False)
            if r.returncode != 0:
                errors.append(NetnsError(f"ip netns del {ns}: {r.stderr.strip()}"))
        self._netns.clear()
        for br in reversed(self._bridges):
            r = _run(["ip", "link", "del", br], check=False)
            if r.returncode != 0:
                errors.append(NetnsError(f"ip link del {br}: {r.stderr.strip()}"))
        self._bridges.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise errors[0]

    def describe(self) -> str:
        """Every pod's sidecar and app logs (tails), for failure messages."""
        parts = []
        for pod in self.pods.values():
            if pod.sidecar is not None:
                parts.append(pod.sidecar.describe())
        return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# istio-init
# --------------------------------------------------------------------------------------------


def istio_iptables_rules(
    *,
    proxy_uid: int = PROXY_UID,
    proxy_gid: int = PROXY_GID,
    inbound_ports: str | Sequence[int] = "*",
    exclude_inbound_ports: Sequence[int] = DEFAULT_EXCLUDED_INBOUND_PORTS,
    exclude_outbound_ips: Sequence[str] = (),
    exclude_outbound_ports: Sequence[int] = (),
) -> str:
    """The nat table istio-init writes (iptables-restore input), as Istio's tools/istio-iptables
    generates it for ``istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*'
    -d 15090,15021,15020`` (the injector's defaults), with the options mapped:
    inbound_ports (-b: "*" or a list), exclude_inbound_ports (-d), exclude_outbound_ips (-x),
    exclude_outbound_ports (-o).

    Differences from istio-init, none of which the harness's pods need: IPv4 only (no ip6tables
    rules: pods have no IPv6 addresses but link-local ones), no DNS capture (no DNS server; the
    53/udp and 53/tcp rules and ISTIO_OUTPUT_DNS are left out), REDIRECT mode only (no TPROXY /
    mangle table), and no -i/--include-outbound-ip-ranges other than "*".
    """
    out = ["* nat"]
    for chain in ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT"):
        out.append(f"-N {chain}")
    # HBONE's port is never captured.
    out.append("-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN")
    out.append(f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {OUTBOUND_CAPTURE_PORT}")
    out.append(f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {INBOUND_CAPTURE_PORT}")
    # Inbound: everything but the excluded ports (-b '*'), or only the listed ports.
    out.append("-A PREROUTING -p tcp -j ISTIO_INBOUND")
    if inbound_ports == "*":
        for p in exclude_inbound_ports:
            out.append(f"-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN")
        out.append("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
    else:
        for p in inbound_ports:
            out.append(f"-A ISTIO_INBOUND -p tcp --dport {p} -j ISTIO_IN_REDIRECT")
    # Outbound.
    out.append("-A OUTPUT -p tcp -j ISTIO_OUTPUT")
    for p in exclude_outbound_ports:
        out.append(f"-A ISTIO_OUTPUT -p tcp --dport {p} -j RETURN")
    # Envoy → app (inbound cluster, bound to 127.0.0.6).
    out.append("-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN")
    # Envoy calling the pod's own IP or a service backed by it: back in as inbound traffic.
    # App → localhost: not captured. Envoy's own traffic (uid, then gid 1337): not captured.
    for owner in (f"--uid-owner {proxy_uid}", f"--gid-owner {proxy_gid}"):
        out.append(f"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp ! --dport 15008 -m owner {owner} -j ISTIO_IN_REDIRECT")
        out.append(f"-A ISTIO_OUTPUT -o lo -m owner ! {owner} -j RETURN")
        out.append(f"-A ISTIO_OUTPUT -m owner {owner} -j RETURN")
    out.append("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN")
    for cidr in exclude_outbound_ips:
        out.append(f"-A ISTIO_OUTPUT -d {cidr} -j RETURN")
    # Everything else the app sends goes to Envoy's virtualOutbound.
    out.append("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
    out.append("COMMIT")
    return "\n".join(out) + "\n"
