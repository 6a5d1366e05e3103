"""A proxyless gRPC *server* (grpcio with xds=True), for tests/interop/test_grpc_proxyless.py.

It reads its xDS bootstrap from GRPC_XDS_BOOTSTRAP_CONFIG (with
server_listener_resource_name_template), listens on argv[1] (ip:port) and serves
/echo.Echo/Hello answering argv[2] — but only once its xDS Listener
`xds.istio.io/grpc/lds/inbound/<ip:port>` has arrived: until then grpcio does not serve the port.
Prints one JSON line when started, and stops when stdin closes.
"""

import json
import sys
from concurrent import futures

import grpc


def main() -> int:
    addr, ident = sys.argv[1], sys.argv[2]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), xds=True)
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: ident.encode())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", {"Hello": handler}),))
    server.add_insecure_port(addr)
    server.start()
    print(json.dumps({"started": addr}), flush=True)
    sys.stdin.read()
    server.stop(grace=None).wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
