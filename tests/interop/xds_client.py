"""A proxyless gRPC client driven over stdin, for tests/interop/test_grpc_proxyless.py.

Runs in its own process because grpcio reads the xDS bootstrap (GRPC_XDS_BOOTSTRAP_CONFIG) once
per xDS client, and the test needs one long-lived channel whose xDS watches follow meshd's
pushes. Protocol, one JSON object per line:

  stdin:  {"cmd": "call", "n": 20, "timeout": 5, "metadata": [["x-version", "v2"]]}
  stdout: {"ok": {"<server id>": count, ...}, "errors": {"<code>: <details>": count, ...}}

The channel target is argv[1] (e.g. xds:///echo.default.svc.cluster.local:7070); the method is
/echo.Echo/Hello, answered by the test's echo servers with their id.
"""

import json
import sys

import grpc


def main() -> int:
    target = sys.argv[1]
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    hello = channel.unary_unary("/echo.Echo/Hello")
    print(json.dumps({"ready": target}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("cmd") == "quit":
            break
        ok: dict[str, int] = {}
        errors: dict[str, int] = {}
        metadata = [tuple(kv) for kv in req.get("metadata", [])]
        for _ in range(int(req.get("n", 1))):
            try:
                who = hello(b"ping", timeout=float(req.get("timeout", 5)), metadata=metadata).decode()
                ok[who] = ok.get(who, 0) + 1
            except grpc.RpcError as e:  # reported to the test, which decides
                key = f"{e.code().name}: {e.details()}"
                errors[key] = errors.get(key, 0) + 1
        print(json.dumps({"ok": ok, "errors": errors}), flush=True)
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
