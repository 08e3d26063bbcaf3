"""`quorum predict`: classify one digit with a running server's quorum.v1.EnsembleService and
show the vote and every member's part.

    quorum predict --digits-index 42
    quorum predict drawing.png --address quorum.example:8500 --ca ca.pem --token "$TOKEN"
    quorum predict --values "0,0,5,13,9,1,0,0,..." --policy majority --json

The input is one row of 64 pixel values on the digits' 0..16 scale: from an image file
(converted as service.client.images explains), from --values, or row N of sklearn's digits.
Exit status: 0 on an answer, 1 when the server refuses or fails, 2 on a bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
import numpy as np

from service._proto.quorum.v1 import ensemble_pb2 as pb
from service._proto.quorum.v1 import ensemble_pb2_grpc as pb_grpc
from service.client.images import load_pixels

PREFIX = "VOTING_POLICY_"
POLICIES = {name[len(PREFIX):].lower(): value for name, value in pb.VotingPolicy.items()
            if value != pb.VOTING_POLICY_UNSPECIFIED}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict", help="classify one digit with a running server (quorum.v1 EnsembleService)",
        description="Send one 8x8 digit to quorum.v1.EnsembleService/Predict and print the vote "
                    "and each member's vote.",
        epilog="Images are converted to the model's scale: grayscale, inverted if the background "
               "is light, contrast-stretched, resized to 8x8 by area averaging, scaled to 0..16.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("image", nargs="?", type=Path,
                        help="image file: PNG, PGM/PPM, .npy (JPEG and others need Pillow)")
    source.add_argument("--values", help="64 comma-separated pixel values, 0..16, row by row")
    source.add_argument("--digits-index", type=int, metavar="N", help="row N of sklearn's digits dataset")
    parser.add_argument("--address", default="localhost:8500", help="server host:port (default localhost:8500)")
    parser.add_argument("--model", default="digits", help="ensemble or model name (default digits)")
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


def _pixels(args: argparse.Namespace) -> tuple[np.ndarray, int | None]:
    """(64 float32 values, the true label when known)."""
    if args.digits_index is not None:
        from sklearn.datasets import load_digits

        data = load_digits()
        if not 0 <= args.digits_index < len(data.target):
            raise ValueError(f"--digits-index must be in 0..{len(data.target) - 1}")
        return data.data[args.digits_index].astype(np.float32), int(data.target[args.digits_index])
    if args.values is not None:
        try:
            values = np.array([float(v) for v in args.values.replace(",", " ").split()], dtype=np.float32)
        except ValueError as exc:
            raise ValueError(f"--values: {exc}") from None
        if values.size != 64:
            raise ValueError(f"--values needs 64 numbers, got {values.size}")
        return values, None
    return load_pixels(args.image), None


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


def _request(args: argparse.Namespace, pixels: np.ndarray) -> pb.PredictRequest:
    request = pb.PredictRequest(model=args.model, return_member_votes=True, inputs=pb.Tensor(
        dtype="FP32", shape=[1, pixels.size], content=np.ascontiguousarray(pixels, dtype="<f4").tobytes()))
    if args.policy:
        request.policy = POLICIES[args.policy]
    if args.latency_budget_ms is not None:
        request.latency_budget_ms = args.latency_budget_ms
    return request


def _as_dict(response: pb.PredictResponse, pixels: np.ndarray, expected: int | None) -> dict:
    prediction = response.predictions[0]
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
        "input": pixels.tolist(), "expected": expected,
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


def run(args: argparse.Namespace) -> int:
    try:
        pixels, expected = _pixels(args)
        channel = _channel(args)
    except (ValueError, OSError) as exc:  # ImageError is a ValueError
        print(f"quorum predict: {exc}", file=sys.stderr)
        return 2
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
    with channel:
        try:
            response = pb_grpc.EnsembleServiceStub(channel).Predict(
                _request(args, pixels), timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"quorum predict: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    answer = _as_dict(response, pixels, expected)
    if args.json:
        json.dump(answer, sys.stdout, indent=2)
        print()
    else:
        _print_text(answer)
    return 0


__all__ = ["add_parser", "run"]
