"""Request bodies read whole and bounded: a chunked body arrives in pieces, and one read returns one.

``request.content.read(n)`` returns what has arrived so far, so a chunked upload larger than the
limit used to be parsed cut short ("Unterminated string") instead of refused as too large.
"""

from __future__ import annotations

from aiohttp import web


class BodyTooLarge(Exception):
    """The body (declared or received) is larger than the limit: answer 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"body larger than {limit} bytes")
        self.limit = limit


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The whole body, or :class:`BodyTooLarge` as soon as more than ``limit`` bytes are declared or read."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
