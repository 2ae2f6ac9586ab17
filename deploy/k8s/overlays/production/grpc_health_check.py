"""The exec probe of inkling's servers once they speak TLS (deploy/k8s/overlays/production).

The kubelet's own gRPC probe connects in plaintext and presents no certificate, so it
cannot check a server whose port speaks only TLS. This script, run inside the server's
container by an exec probe, makes the same grpc.health.v1 `Check` over TLS and exits 0
when the service answers SERVING, 1 otherwise (NOT_SERVING while the app loads and
after SIGTERM, inkling/serving/runtime.py), 2 when it could not ask.

It checks the server's certificate against `--ca-file` for the name `--server-name`,
the name callers use (the Service's), not the loopback address it connects to. The
health service needs no caller identity (inkling/serving/security.py, OPEN_SERVICES),
so no client certificate or token is sent; a server that requires client certificates
(`client_ca_file`) would need one added here.

    python grpc_health_check.py --port 50062 --service inkling.v1.RankingService \
        --ca-file /etc/inkling/tls/ca.crt --server-name inkling-ranking

Shipped in the ConfigMap inkling-probe, not in the image; only grpcio and
grpcio-health-checking, which the image has, are imported.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(port: int, service: str, ca_file: str, server_name: str, timeout_s: float) -> int:
    """0 when `service` on 127.0.0.1:`port` answers SERVING over TLS, 1 when it answers
    anything else, 2 when the call fails (no connection, handshake, deadline)."""
    with open(ca_file, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = [("grpc.ssl_target_name_override", server_name)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as e:
            print(f"health check of {service!r} failed: {e.code().name}", file=sys.stderr)
            return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{service!r} is {status}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the server's gRPC port")
    parser.add_argument("--service", default="", help='health service name ("" = the server)')
    parser.add_argument("--ca-file", required=True, help="CA certificates (PEM) to trust")
    parser.add_argument("--server-name", required=True, help="the name its certificate holds")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="the call's deadline")
    args = parser.parse_args(argv)
    return check(args.port, args.service, args.ca_file, args.server_name, args.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
