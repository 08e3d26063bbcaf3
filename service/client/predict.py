"""`quorum predict`: classify rows with a running server's quorum.v1.EnsembleService and show
the vote and every member's part, for any model or ensemble.

    quorum predict bc --values 13.5,14.4,87.5,...          # one row
    quorum predict bc --file rows.csv --json               # rows.npy or rows.csv, one row a line
    cat rows.csv | quorum predict bc                       # rows on stdin
    quorum predict --digits-index 42                       # the bundled digits ensemble
    quorum predict drawing.png --address quorum.example:8500 --ca ca.pem --token "$TOKEN"

The model's input name, dtype and row shape come from its KServe v2 ModelMetadata, so every
row is checked before it is sent. Images and --digits-index are for models of 64 digit pixels
(0..16). Exit status: 0 on an answer, 1 when the server refuses or fails, 2 on a bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import grpc
import numpy as np

from service._proto.inference import grpc_service_pb2 as v2
from service._proto.inference import grpc_service_pb2_grpc as v2_grpc
from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from service.client.images import load_pixels

PREFIX = "VOTING_POLICY_"
POLICIES = {name[len(PREFIX):].lower(): name for name, value in pb.VotingPolicy.items()
            if value != pb.VOTING_POLICY_UNSPECIFIED}
"""--policy's choices -> the enum value's name (a message's constructor takes an enum by name)."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict", help="classify rows with a running server (quorum.v1 EnsembleService)",
        description="Send rows to quorum.v1.EnsembleService/Predict and print the vote and each "
                    "member's vote. The model's input spec is read from its KServe v2 metadata.",
        epilog="Rows: --values, --file (.npy, or .csv with one row per line), or stdin (CSV or "
               "whitespace-separated, one row per line). For digit models also an image file or "
               "--digits-index. Images are converted to the digits' scale: grayscale, inverted if "
               "the background is light, contrast-stretched, resized to 8x8 by area averaging, "
               "scaled to 0..16.")
    parser.add_argument("target", nargs="?", metavar="MODEL",
                        help="model or ensemble name (default: --model, digits); an image file here "
                             "is read as --image, as in earlier versions")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--values", help="one row of comma-separated numbers (rows separated by ';')")
    source.add_argument("--file", type=Path, help="rows as .npy (2-D or one row) or .csv (one row per line)")
    source.add_argument("--image", type=Path,
                        help="digit image file: PNG, PGM/PPM, .npy (JPEG and others need Pillow)")
    source.add_argument("--digits-index", type=int, metavar="N", help="row N of sklearn's digits dataset")
    parser.add_argument("--address", default="localhost:8500", help="server host:port (default localhost:8500)")
    parser.add_argument("--model", default=None, help="model name, when not given as MODEL (default digits)")
    parser.add_argument("--policy", choices=sorted(POLICIES), help="voting policy for this request "
                        "(default: the ensemble's own)")
    parser.add_argument("--latency-budget-ms", type=float,
                        help="vote with the members that answer within this many ms")
    parser.add_argument("--timeout", type=float, default=10.0, help="RPC deadline in seconds (default 10)")
    parser.add_argument("--token", help="bearer token, sent as 'authorization: Bearer TOKEN'")
    parser.add_argument("--ca", type=Path, help="PEM CA bundle to verify the server with; turns TLS on")
    parser.add_argument("--cert", type=Path, help="PEM client certificate chain, for mutual TLS")
    parser.add_argument("--key", type=Path, help="PEM client private key, for mutual TLS")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    return parser


IMAGE_SUFFIXES = (".png", ".pgm", ".ppm", ".pnm", ".npy", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
DIGIT_FEATURES = 64


def _parse_rows(text: str, where: str) -> np.ndarray:
    lines = [line for line in text.replace(";", "\n").splitlines() if line.strip()]
    if lines and not _numeric(lines[0]):
        lines = lines[1:]  # a CSV header
    try:
        rows = [[float(v) for v in line.replace(",", " ").split()] for line in lines]
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not rows:
        raise ValueError(f"{where}: no rows")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{where}: rows have different lengths {sorted(widths)}")
    return np.asarray(rows, dtype=np.float64)


def _numeric(line: str) -> bool:
    try:
        [float(v) for v in line.replace(",", " ").split()]
        return True
    except ValueError:
        return False


def _rows(args: argparse.Namespace, stdin: TextIO | None) -> tuple[np.ndarray, list[int | None]]:
    """(rows as float64 (n, features), the true label of each row when known)."""
    if args.digits_index is not None:
        from sklearn.datasets import load_digits

        data = load_digits()
        if not 0 <= args.digits_index < len(data.target):
            raise ValueError(f"--digits-index must be in 0..{len(data.target) - 1}")
        return data.data[args.digits_index][None].astype(np.float64), [int(data.target[args.digits_index])]
    if args.values is not None:
        return _parse_rows(args.values, "--values"), []
    if args.image is not None:
        return load_pixels(args.image)[None].astype(np.float64), []
    if args.file is not None:
        if not args.file.is_file():
            raise ValueError(f"--file {args.file}: no such file")
        if args.file.suffix.lower() == ".npy":
            try:
                array = np.load(args.file, allow_pickle=False)
            except ValueError as exc:
                raise ValueError(f"--file {args.file}: {exc}") from None
            if array.dtype.kind not in "fiub":
                raise ValueError(f"--file {args.file}: holds {array.dtype}, not numbers")
            return (array[None] if array.ndim == 1 else array.reshape(len(array), -1)).astype(np.float64), []
        return _parse_rows(args.file.read_text(), f"--file {args.file}"), []
    if stdin is None or stdin.isatty():
        raise ValueError("give rows with --values, --file or on stdin (or --digits-index, or an image)")
    return _parse_rows(stdin.read(), "stdin"), []


def _input_spec(channel: grpc.Channel, model: str, timeout: float, metadata) -> tuple[str, str, list[int]]:
    """(input name, KServe datatype, shape) from the model's v2 metadata."""
    answer = v2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
        v2.ModelMetadataRequest(name=model), timeout=timeout, metadata=metadata)
    if len(answer.inputs) != 1:
        raise ValueError(f"model '{model}' takes {len(answer.inputs)} inputs; quorum predict sends one")
    spec = answer.inputs[0]
    return spec.name, spec.datatype, list(spec.shape)


def _check_width(rows: np.ndarray, model: str, name: str, datatype: str, shape: list[int], where: str) -> np.ndarray:
    want = int(np.prod([d for d in shape[1:]])) if len(shape) > 1 else 1
    if rows.shape[1] != want:
        raise ValueError(f"{where} needs {want} numbers per row for model '{model}' input '{name}' "
                         f"{datatype} {shape}, got {rows.shape[1]}")
    if datatype != "FP32":
        raise ValueError(f"model '{model}' input '{name}' is {datatype}; quorum predict sends FP32 rows")
    return rows.astype(np.float32)


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together")
    if args.ca is None and args.cert is None:
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.ca.read_bytes() if args.ca else None,
        private_key=args.key.read_bytes() if args.key else None,
        certificate_chain=args.cert.read_bytes() if args.cert else None)
    return grpc.secure_channel(args.address, credentials)


def _request(args: argparse.Namespace, model: str, rows: np.ndarray) -> pb.PredictRequest:
    request = pb.PredictRequest(model=model, return_member_votes=True, inputs=pb.Tensor(
        dtype="FP32", shape=list(rows.shape), content=np.ascontiguousarray(rows, dtype="<f4").tobytes()),
        policy=POLICIES[args.policy] if args.policy else None)
    if args.latency_budget_ms is not None:
        request.latency_budget_ms = args.latency_budget_ms
    return request


def _as_dict(response: pb.PredictResponse, row: int, values: np.ndarray, expected: int | None) -> dict:
    prediction = response.predictions[row]
    return {
        "model": response.model, "request_id": response.request_id,
        "policy": pb.VotingPolicy.Name(response.policy)[len(PREFIX):].lower(),
        "label": prediction.label, "class_index": prediction.class_index,
        "confidence": prediction.confidence, "agreement": prediction.agreement,
        "probabilities": list(prediction.probabilities),
        "members_left_out": list(response.members_left_out),
        "member_votes": [{"member": v.member, "version": v.version, "label": v.label,
                          "class_index": v.class_index, "confidence": v.confidence, "weight": v.weight,
                          "latency_ms": v.latency_ms, "in_time": v.in_time}
                         for v in prediction.member_votes],
        "input": values.tolist(), "expected": expected,
    }


def _print_text(answer: dict, out=sys.stdout) -> None:
    expected = "" if answer["expected"] is None else f"  (expected {answer['expected']})"
    print(f"{answer['model']}: {answer['label']}  confidence {answer['confidence']:.3f}  "
          f"agreement {answer['agreement']:.3f}  policy {answer['policy']}{expected}", file=out)
    rows = [("member", "label", "confidence", "weight", "latency ms", "in time")]
    for v in answer["member_votes"]:
        rows.append((v["member"], v["label"] if v["in_time"] else "-", f"{v['confidence']:.3f}",
                     f"{v['weight']:.3f}", f"{v['latency_ms']:.2f}", "yes" if v["in_time"] else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip(),
              file=out)
    if answer["members_left_out"]:
        print(f"left out (late): {', '.join(answer['members_left_out'])}", file=out)


def _source_where(args: argparse.Namespace) -> str:
    return "--values" if args.values is not None else (f"--file {args.file}" if args.file else
                                                        "stdin" if args.image is None and args.digits_index is None
                                                        else "the image" if args.image else "--digits-index")


def run(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    target, model = args.target, args.model
    if target and Path(target).suffix.lower() in IMAGE_SUFFIXES and Path(target).is_file():
        if args.image is not None or args.values is not None or args.file is not None or args.digits_index is not None:
            print("quorum predict: give one input: an image, --values, --file or --digits-index", file=sys.stderr)
            return 2
        args.image, target = Path(target), None  # `quorum predict digit.png`, as before
    model = target or model or "digits"
    try:
        rows, expected = _rows(args, sys.stdin if stdin is None else stdin)
        channel = _channel(args)
    except (ValueError, OSError) as exc:  # ImageError is a ValueError
        print(f"quorum predict: {exc}", file=sys.stderr)
        return 2
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
    with channel:
        try:
            name, datatype, shape = _input_spec(channel, model, args.timeout, metadata)
            rows = _check_width(rows, model, name, datatype, shape, _source_where(args))
            response = pb_grpc.EnsembleServiceStub(channel).Predict(
                _request(args, model, rows), timeout=args.timeout, metadata=metadata)
        except ValueError as exc:
            print(f"quorum predict: {exc}", file=sys.stderr)
            return 2
        except grpc.RpcError as exc:
            print(f"quorum predict: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    answers = [_as_dict(response, i, rows[i], expected[i] if i < len(expected) else None)
               for i in range(len(rows))]
    if args.json:
        json.dump(answers[0] if len(answers) == 1 else answers, sys.stdout, indent=2)
        print()
    else:
        for i, answer in enumerate(answers):
            if len(answers) > 1:
                print(f"row {i}: ", end="")
            _print_text(answer)
    return 0


__all__ = ["add_parser", "run"]
