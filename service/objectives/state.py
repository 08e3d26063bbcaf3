"""Which feedback store a server uses: in process without --state-url, else Redis at that URL
(checked here, and named in messages without its password)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from service.objectives.feedback import FeedbackStore
from service.objectives.store import Store

SETTING = "(--state-url, QUORUM_STATE_URL)"
SCHEMES = ("redis", "rediss")


def describe_url(url: str) -> tuple[str, str | None]:
    """(the URL as messages show it, without a password; why it cannot work, or None)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # ValueError when it is not a number
    except ValueError as exc:
        return _masked(url), f"malformed: {exc}"
    shown = f"{parts.scheme}://{parts.hostname or ''}{f':{port}' if port else ''}{parts.path}"
    if parts.scheme not in SCHEMES:  # shown as given (less any password): it may have no scheme at all
        return _masked(url), f"malformed: the scheme must be redis:// or rediss:// (TLS), not {parts.scheme or 'none'!r}"
    if not parts.hostname:
        return shown, "malformed: no host (redis://host:port/db)"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return shown, f"malformed: the database must be a number (redis://host:port/0), not {db!r}"
    return shown, None


def _masked(url: str) -> str:
    head, at, tail = url.rpartition("@")
    return f"{head.split('//')[0]}//***@{tail}" if at else url


def open_store(url: str | None, *, password_file: Path | None = None, ttl_s: float = 86400.0,
               refresh_s: float = 1.0, queue_size: int = 10_000) -> Store:
    """The in-process store without a URL; a Redis store otherwise (one that reports why it
    cannot work when the URL is malformed or the password file unreadable)."""
    if not url:
        return FeedbackStore()
    from service.objectives.redis_store import RedisStore  # redis is imported only when configured

    name, problem = describe_url(url)
    password = None
    if password_file is not None and problem is None:
        try:
            password = password_file.read_text().strip() or None
        except OSError as exc:
            problem = f"its password file {str(password_file)!r} (QUORUM_STATE_PASSWORD_FILE) cannot be read: {exc.strerror}"
    return RedisStore(url, name, password=password, ttl_s=ttl_s, refresh_s=refresh_s, queue_size=queue_size,
                      broken=problem)


def startup_line(store: Store, problem: str) -> str:
    """The one line a server logs (or refuses to start with) when its store cannot be used."""
    return f"feedback store {store.name} {SETTING}: {problem}"
