"""HTTP beside gRPC: what a request costs the server on each front.

    python bench/http_overhead.py stacks [--seconds 5] [--concurrency 1 16]
    python bench/http_overhead.py quorum [--seconds 5] [--concurrency 1 16] [--model digits_mlp_a]

`stacks` picks the HTTP stack: each candidate (aiohttp, uvicorn+starlette with httptools)
runs in one process beside a grpc.aio server on the same asyncio loop, as Quorum runs it,
answering POST /v2/models/m/infer with a precomputed JSON body after parsing the request's
JSON (the least any v2 front must do); the bare grpc.aio floor answers ModelInfer with
precomputed bytes. `quorum` starts the real server and sends the same one-row request to
the v2 ModelInfer RPC and to /v2/models/<model>/infer (JSON, and binary tensors).

Printed per case: requests/s and the server's CPU per request (read from /proc), which is
what a front adds; the client shares the machine, so the CPU figure is the one to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.floor_server import precomputed_response  # noqa: E402

ANSWER = json.dumps({"model_name": "m", "model_version": "1", "outputs": [
    {"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10},
    {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["7"]},
    {"name": "class_index", "datatype": "INT64", "shape": [1], "data": [7]},
    {"name": "confidence", "datatype": "FP32", "shape": [1], "data": [0.9]}]}).encode()
ROW = [float(x) for x in range(64)]
REQUEST = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}).encode()


# -- the candidate stacks, each in a server process of its own ---------------------------------
_KEEP: list = []


async def _grpc_floor(port: int):
    import grpc

    answer = precomputed_response()

    async def model_infer(request: bytes, context) -> bytes:
        return answer

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    _KEEP.append(server)  # a grpc.aio server nobody references is stopped by the GC
    return server


async def _serve_aiohttp(http_port: int, grpc_port: int) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/{name}/infer", infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", http_port).start()
    await _grpc_floor(grpc_port)
    await asyncio.Event().wait()


async def _serve_starlette(http_port: int, grpc_port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request) -> Response:
        json.loads(await request.body())
        return Response(ANSWER, media_type="application/json")

    app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=http_port, http="httptools", loop="none",
                            lifespan="off", access_log=False, log_level="warning")
    await _grpc_floor(grpc_port)
    await uvicorn.Server(config).serve()


STACKS = {"aiohttp": _serve_aiohttp, "uvicorn+starlette": _serve_starlette}


# -- the load ----------------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(call, concurrency: int, seconds: float) -> int:
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            await call()
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def _http_client(url: str, body: bytes, headers: dict[str, str] | None = None):
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    base = {"Content-Type": "application/json", **(headers or {})}

    async def call() -> None:
        async with session.post(url, data=body, headers=base) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {await response.text()}")

    return session, call


async def _grpc_client(address: str, payload: bytes):
    import grpc

    channel = grpc.aio.insecure_channel(address)
    method = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

    async def call() -> None:
        await method(payload)

    return channel, call


async def _measure(pid: int, make_client, concurrency: int, seconds: float) -> tuple[float, float]:
    closer, call = await make_client()
    await _load(call, concurrency, min(1.0, seconds))  # warm-up: connections, caches
    cpu, start = _cpu_s(pid), time.monotonic()
    done = await _load(call, concurrency, seconds)
    elapsed, cpu = time.monotonic() - start, _cpu_s(pid) - cpu
    await closer.close()
    return done / elapsed, cpu / done * 1e6


def _print(case: str, concurrency: int, rate: float, cpu_us: float) -> None:
    print(f"{case:<34} c={concurrency:<3} {rate:8.0f} req/s  {cpu_us:7.0f} us server CPU/request", flush=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


def stacks(args: argparse.Namespace) -> None:
    for stack in STACKS:
        http_port, grpc_port = _free_port(), _free_port()
        process = subprocess.Popen([sys.executable, __file__, "_serve", stack, str(http_port), str(grpc_port)])
        try:
            _wait_port(http_port)
            _wait_port(grpc_port)
            for c in args.concurrency:
                if stack == "aiohttp":  # the same floor server either way; measured once
                    rate, cpu = asyncio.run(_measure(process.pid, lambda: _grpc_client(
                        f"127.0.0.1:{grpc_port}", precomputed_response()), c, args.seconds))
                    _print("grpc.aio floor (precomputed)", c, rate, cpu)
                rate, cpu = asyncio.run(_measure(process.pid, lambda: _http_client(
                    f"http://127.0.0.1:{http_port}/v2/models/m/infer", REQUEST), c, args.seconds))
                _print(f"{stack} (parse JSON, precomputed)", c, rate, cpu)
        finally:
            process.terminate()
            process.wait()


def quorum(args: argparse.Namespace) -> None:
    from service._proto.inference import grpc_service_pb2 as pb
    from tests.helpers import MODELS
    from tests.server import running_server

    import tempfile

    pixels = np.asarray([ROW], dtype=np.float32)
    request = pb.ModelInferRequest(model_name=args.model)
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(pixels.tobytes())
    payload = request.SerializeToString()
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                     "parameters": {"binary_data_size": pixels.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    binary = header + pixels.tobytes()
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp), MODELS) as server:
        pid = server.process.pid
        url = f"http://127.0.0.1:{server.http_port}/v2/models/{args.model}/infer"
        for c in args.concurrency:
            rate, cpu = asyncio.run(_measure(pid, lambda: _grpc_client(server.address, payload), c, args.seconds))
            _print(f"gRPC ModelInfer {args.model}", c, rate, cpu)
            rate, cpu = asyncio.run(_measure(pid, lambda: _http_client(url, REQUEST), c, args.seconds))
            _print(f"HTTP /infer JSON {args.model}", c, rate, cpu)
            rate, cpu = asyncio.run(_measure(pid, lambda: _http_client(
                url, binary, {"Inference-Header-Content-Length": str(len(header)),
                              "Content-Type": "application/octet-stream"}), c, args.seconds))
            _print(f"HTTP /infer binary {args.model}", c, rate, cpu)
        server.stop()


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["_serve"]:
        stack, http_port, grpc_port = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        asyncio.run(STACKS[stack](http_port, grpc_port))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["stacks", "quorum"])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--model", default="digits_mlp_a")
    args = p.parse_args(argv)
    (stacks if args.what == "stacks" else quorum)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
