"""The app and the client the sidecar harness runs inside pods (``ip netns exec <pod> python …``).

  python pod_tools.py serve NAME IP PORT
      An HTTP/1.1 server on IP:PORT. GET /echo answers JSON {"name", "peer", "path", "headers"}
      (peer: the caller's address as the app sees it, 127.0.0.6 when the pod's sidecar delivered
      the request); any other GET answers NAME as text/plain, with header X-Backend: NAME. Prints
      {"ready": "IP:PORT"} on stdout once listening.

  python pod_tools.py get JSON
      JSON: {"url", "n" (1), "headers" ({}), "resolve" ({host: ip}), "timeout" (5)}. Makes n GETs,
      each on a new connection, and prints a JSON list with one {"status", "headers", "body"} or
      {"error"} per request. Host names go through "resolve" (the pods have no DNS server); the
      Host header keeps the name. Exits 0 whatever the requests' outcome.

Only the standard library: it runs under the test venv's interpreter but needs none of it.
"""

from __future__ import annotations

import http.client
import json
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        name = self.server.app_name
        if self.path.split("?", 1)[0] == "/echo":
            body = json.dumps(
                {
                    "name": name,
                    "peer": self.client_address[0],
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            ).encode()
            ctype = "application/json"
        else:
            body = name.encode()
            ctype = "text/plain"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", name)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.client_address[0], fmt % args))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(name: str, ip: str, port: int) -> int:
    srv = _Server((ip, port), _Handler)
    srv.app_name = name
    print(json.dumps({"ready": f"{ip}:{port}"}), flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def get(req: dict) -> int:
    url = urllib.parse.urlsplit(req["url"])
    host = url.hostname
    port = url.port or (443 if url.scheme == "https" else 80)
    connect = req.get("resolve", {}).get(host, host)
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    host_header = url.netloc
    results = []
    for _ in range(int(req.get("n", 1))):
        conn = http.client.HTTPConnection(connect, port, timeout=float(req.get("timeout", 5)))
        try:
            conn.request("GET", path, headers={"Host": host_header, **req.get("headers", {})})
            r = conn.getresponse()
            body = r.read().decode(errors="replace")
            results.append({"status": r.status, "headers": {k.lower(): v for k, v in r.getheaders()}, "body": body})
        except OSError as e:
            results.append({"error": f"{type(e).__name__}: {e}"})
        except http.client.HTTPException as e:
            results.append({"error": f"{type(e).__name__}: {e}"})
        finally:
            conn.close()
    print(json.dumps(results), flush=True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[1] == "serve":
        return serve(argv[2], argv[3], int(argv[4]))
    if len(argv) == 3 and argv[1] == "get":
        return get(json.loads(argv[2]))
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
