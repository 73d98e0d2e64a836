"""The scheduler's waiting queue: requests in order, with O(1) membership, removal from anywhere and a count
of the adapter names queued (the engine publishes those every step; scanning a flooded queue cost O(queue))."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator

from loraplex.server.engine.request import Request


class WaitingQueue:
    def __init__(self) -> None:
        self._items: OrderedDict[Request, None] = OrderedDict()  # Request hashes by identity (eq=False)
        self._adapters: Counter[str] = Counter()

    def append(self, req: Request) -> None:
        self._items[req] = None
        self._count(req, 1)

    def appendleft(self, req: Request) -> None:
        self.append(req)
        self._items.move_to_end(req, last=False)

    def extendleft(self, reqs: Iterable[Request]) -> None:
        """As deque.extendleft: each goes to the front in turn (pass them reversed to keep their order)."""
        for req in reqs:
            self.appendleft(req)

    def popleft(self) -> Request:
        req, _ = self._items.popitem(last=False)
        self._count(req, -1)
        return req

    def remove(self, req: Request) -> None:
        del self._items[req]
        self._count(req, -1)

    def adapter_names(self) -> tuple[str, ...]:
        """Distinct adapter names of the queued requests, sorted (O(distinct names), not O(queue))."""
        return tuple(sorted(self._adapters))

    def __contains__(self, req: object) -> bool:
        return req in self._items

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def _count(self, req: Request, delta: int) -> None:
        if req.adapter:
            self._adapters[req.adapter] += delta
            if not self._adapters[req.adapter]:
                del self._adapters[req.adapter]
