"""Quorum: gRPC inference-and-ensemble serving."""

__version__ = "0.1.0"
