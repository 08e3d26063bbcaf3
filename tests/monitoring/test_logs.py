"""Log lines as text or JSON, with the request id of the request being handled."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from service.logs import REQUEST_ID, configure_logging


def _lines(fmt: str, emit) -> list[str]:
    stream = io.StringIO()
    configure_logging("INFO", fmt, stream)
    try:
        emit()
    finally:
        configure_logging("WARNING", "text")
    return stream.getvalue().splitlines()


def test_json_lines_carry_the_request_id_only_while_a_request_is_handled():
    def emit():
        logging.getLogger("service.test").info("loaded %s", "digits")
        token = REQUEST_ID.set("req-42")
        logging.getLogger("service.test").warning("slow member")
        REQUEST_ID.reset(token)

    first, second = map(json.loads, _lines("json", emit))
    assert first["message"] == "loaded digits" and first["level"] == "INFO" and "request_id" not in first
    assert second["request_id"] == "req-42" and second["logger"] == "service.test" and "time" in second


def test_text_lines_end_with_the_request_id():
    def emit():
        token = REQUEST_ID.set("abc")
        logging.getLogger("x").info("hello")
        REQUEST_ID.reset(token)
        logging.getLogger("x").info("bye")

    hello, bye = _lines("text", emit)
    assert hello.endswith("x: hello [request_id=abc]") and bye.endswith("x: bye")


def test_concurrent_requests_never_see_each_others_id():
    seen = {}

    async def handle(request_id: str) -> None:
        REQUEST_ID.set(request_id)
        await asyncio.sleep(0)
        seen[request_id] = REQUEST_ID.get()

    async def main():
        await asyncio.gather(*(handle(f"r{i}") for i in range(20)))

    asyncio.run(main())
    assert all(k == v for k, v in seen.items()) and len(seen) == 20
