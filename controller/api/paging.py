"""What the paged listings share: page sizes, opaque page tokens and a byte budget per page,
so no response can outgrow a client's default 4 MiB receive limit."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.message import Message

from controller.errors import invalid_field

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
# A page ends early rather than grow past this many bytes, whatever page_size asks: half of
# gRPC's default 4 MiB receive limit. One host with the capabilities of all three backends is
# about 7 KiB, without them about 0.5 KiB; a VM's entry is mostly its metadata.
MAX_PAGE_BYTES = 2 << 20

M = TypeVar("M", bound=Message)


def page_size(requested: int) -> int:
    if requested < 0:
        raise invalid_field("page_size", f"must not be negative, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def page_token(kind: str, last_id: str) -> str:
    """The opaque token that continues a listing of `kind` after this id."""
    return base64.urlsafe_b64encode(f"{kind}:{last_id}".encode()).decode()


def token_after(kind: str, token: str) -> str:
    """The id a page token continues after; INVALID_ARGUMENT if this listing did not issue it."""
    if not token:
        return ""
    prefix = f"{kind}:".encode()
    try:
        raw = base64.urlsafe_b64decode(token.encode())
        if raw.startswith(prefix):
            return raw.removeprefix(prefix).decode()
    except (binascii.Error, ValueError, UnicodeError):
        pass
    raise invalid_field("page_token", "is not a token this API issued")


def encoded_size(message: Message) -> int:
    """What one element adds to a repeated field: tag, length prefix and the message."""
    size = message.ByteSize()
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def fill_page(items: Iterable[M], size: int) -> tuple[list[M], bool]:
    """Up to `size` items within the byte budget, and whether more follow. Reads one item
    past the page to know."""
    page: list[M] = []
    used = 0
    for item in items:
        cost = encoded_size(item)
        if len(page) == size or (page and used + cost > MAX_PAGE_BYTES):
            return page, True
        page.append(item)
        used += cost
    return page, False
