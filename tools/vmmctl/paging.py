"""Following a paged listing (ListVms, ListHosts) from page to page."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from tools.vmmctl.output import note

Item = TypeVar("Item")

# One page as the caller's RPC returned it: its items, next_page_token, total_count.
Page = tuple[Sequence[Item], str, int]


@dataclass
class Listing(Generic[Item]):
    """What a listing gathered, and where it stopped."""

    items: list[Item]
    # Continues the listing from where it stopped; empty once the last page was read.
    next_page_token: str
    total_count: int


def collect(fetch: Callable[[str, int], Page[Item]], *, page_size: int = 0,
            page_token: str = "", limit: int = 0, follow: bool = True) -> Listing[Item]:
    """Call fetch(page_token, page_size) for one page after another.

    Stops after the last page, after the first one when not `follow`ing, or once `limit`
    items (0: no limit) are in; the last request then asks for no more than are missing.
    """
    items: list[Item] = []
    token = page_token
    seen: set[str] = set()
    while True:
        size = min(page_size or limit, limit - len(items)) if limit else page_size
        page, token, total = fetch(token, size)
        items.extend(page)
        if not follow or not token or (limit and len(items) >= limit):
            break
        if token in seen:  # a server bug would otherwise loop forever
            note(f"the server repeated page token {token!r}; stopping")
            break
        seen.add(token)
    return Listing(items, token, total)
