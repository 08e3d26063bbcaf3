"""Domain errors raised below the API layer; one handler wrapper (api/wrapped_call.py, with api/status_codes.py) maps
them to gRPC status codes."""

from __future__ import annotations


class QuorumError(Exception):
    """Base of every error Quorum reports to a client."""


class InvalidInput(QuorumError):
    """The request is malformed: wrong dtype, shape, missing input, bad value."""


class ModelNotFound(QuorumError):
    """No such model or version in the repository."""


class ModelNotReady(QuorumError):
    """The model exists but is not loaded (loading, unloaded or failed)."""


class Overloaded(QuorumError):
    """A queue is full; the client should back off and retry.

    `retry_after_s`: about when the work ahead of it will have drained, where measured; the
    gRPC front sends it as `grpc-retry-pushback-ms`, which gRPC clients with a retry
    policy wait before they try again."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(QuorumError):
    """The request's deadline passed before enough of the work was done."""


class FailedPrecondition(QuorumError):
    """The request asks for something the server cannot meet (e.g. an objective)."""


class Unauthenticated(QuorumError):
    """Missing or wrong credentials."""


class Unimplemented(QuorumError):
    """The protocol has this call but Quorum does not serve it; the message says what is."""


class ModelLoadError(QuorumError):
    """A model version could not be loaded; names the folder and the cause."""

    def __init__(self, folder: str, message: str) -> None:
        super().__init__(f"{folder}: {message}")
        self.folder = folder


class ManifestError(ModelLoadError):
    """A version folder's manifest is missing, unreadable or invalid; names the field."""

    def __init__(self, folder: str, field: str, message: str) -> None:
        # field "variant.json": the file itself (missing, not JSON), not a field within it
        super().__init__(folder, f"variant.json {message}" if field == "variant.json"
                         else f"variant.json field '{field}': {message}")
        self.field = field


class PermissionDenied(QuorumError):
    """The server is configured not to do this (e.g. model control RPCs without
    --model-control explicit)."""


class Unavailable(QuorumError):
    """The server cannot take the call now (shutting down); another replica can."""
