"""What one oversized request costs the server's memory, on each gRPC engine:

    python bench/engine_memory.py [--mib 256] [--limit-mib 1]

A bare server (grpc.aio.server or pygrpc_native.aio.server) with a 1 MiB
max_receive_message_length gets one request of --mib MiB of zeros, sent plain and then
gzip-compressed (a few hundred kB on the wire), from a client in another process. Both engines
refuse it with RESOURCE_EXHAUSTED; this prints how much the server's peak RSS grew first.
Each case runs in a fresh server process, so one peak does not hide the next.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys

import grpc


async def serve(engine: str, kind: str, size: int, limit: int) -> None:
    async def echo(request: bytes, context) -> bytes:
        return b"ok"

    if engine == "native":
        import pygrpc_native.aio

        server = pygrpc_native.aio.server(options=[("grpc.max_receive_message_length", limit)])
    else:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
    server.add_registered_method_handlers("probe.Probe", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    client = await asyncio.create_subprocess_exec(sys.executable, __file__, "--client", str(port), kind, str(size),
                                                  stdout=subprocess.PIPE)
    answer, _ = await client.communicate()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) >> 10
    print(f"| {engine} | {kind} | {size >> 20} MiB | {answer.decode().strip()} | +{grown} MiB |", flush=True)
    await server.stop(None)


def client(port: int, kind: str, size: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary("/probe.Probe/Echo")(
                b"\0" * size, timeout=120, compression=grpc.Compression.Gzip if kind == "gzip" else None)
            print("OK")
        except grpc.RpcError as exc:
            print(exc.code().name)


def main() -> int:
    if sys.argv[1:2] == ["--client"]:
        client(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--limit-mib", type=int, default=1)
    p.add_argument("--case", nargs=2, metavar=("ENGINE", "KIND"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        asyncio.run(serve(*args.case, args.mib << 20, args.limit_mib << 20))
        return 0
    print(f"limit {args.limit_mib} MiB\n\n| engine | request | size | answer | server peak RSS |\n|---|---|---|---|---|",
          flush=True)
    for engine in ("grpcio", "native"):
        for kind in ("plain", "gzip"):
            subprocess.run([sys.executable, __file__, "--mib", str(args.mib), "--limit-mib", str(args.limit_mib),
                            "--case", engine, kind], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
