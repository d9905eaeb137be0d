"""Packing inputs into requests, and putting the answers back in input order.

Legacy completions take up to 20 prompts in one request (``prompt`` as a list) and embeddings up to
2,048 inputs, so a bulk job bound by requests per minute runs many times faster when inputs share a
request. A batch is cut by count and by token cost, so it always fits one pass of the limiter. The
answers come back in any order: completions choices carry ``index = prompt_i × n + j`` and embeddings
``index = input_i``. :func:`split_choices` checks that every expected index arrived exactly once; an
input whose answers are missing or duplicated gets an :class:`IncompleteResponse`, never a neighbour's
answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

from .errors import ThrottledOpenAIError

__all__ = ["Batch", "IncompleteResponse", "Packer", "pack", "split_choices"]

T = TypeVar("T")

#: Documented per-request limits: legacy completions "can hold up to 20 unique prompts"; embeddings
#: take up to 2,048 inputs and 300,000 tokens in one request.
MAX_PROMPTS_PER_COMPLETION = 20
MAX_INPUTS_PER_EMBEDDING = 2048
MAX_TOKENS_PER_EMBEDDING = 300_000


class IncompleteResponse(ThrottledOpenAIError):
    """The server's answer to a batch had no answer, or more than one, for this input."""


@dataclass(frozen=True, eq=False)
class Batch(Generic[T]):
    """Inputs sent together: ``positions[k]`` is the input position of ``items[k]``."""

    positions: Tuple[int, ...]
    items: Tuple[T, ...]
    cost: int

    def halves(self, cost: Callable[[T], int]) -> Tuple[Batch[T], Batch[T]]:
        """The batch cut in two, to find the one input a 400 is about."""
        middle = len(self.items) // 2
        left, right = self.items[:middle], self.items[middle:]
        return (
            Batch(self.positions[:middle], left, sum(map(cost, left))),
            Batch(self.positions[middle:], right, sum(map(cost, right))),
        )


class Packer(Generic[T]):
    """:func:`pack` as steps that do no I/O, for a driver that reads its input or its budget with
    ``await``: :meth:`add` each ``(position, item, cost)``; when it returns the batch the item did not
    fit in, set :attr:`budget` for the batch the item started (``None``: no bound). :meth:`flush`
    returns what is left (``None`` when nothing is)."""

    def __init__(self, max_items: int, budget: Optional[int], kind: Optional[Callable[[T], Hashable]] = None) -> None:
        self.max_items = max_items
        self.budget = budget
        self.kind = kind
        self._positions: List[int] = []
        self._items: List[T] = []
        self._total = 0

    def add(self, position: int, item: T, cost: int) -> Optional[Batch[T]]:
        cut = None
        if self._items:
            full = len(self._items) >= self.max_items or (self.budget is not None and self._total + cost > self.budget)
            if full or (self.kind is not None and self.kind(item) != self.kind(self._items[0])):
                cut = self.flush()
        self._positions.append(position)
        self._items.append(item)
        self._total += cost
        return cut

    def flush(self) -> Optional[Batch[T]]:
        if not self._items:
            return None
        batch = Batch(tuple(self._positions), tuple(self._items), self._total)
        self._positions, self._items, self._total = [], [], 0
        return batch


def pack(
    items: Iterable[Tuple[int, T, int]],
    max_items: int,
    max_cost: Callable[[], Optional[int]],
    kind: Optional[Callable[[T], Hashable]] = None,
) -> Iterator[Batch[T]]:
    """Group consecutive ``(position, item, cost)`` into batches of at most ``max_items`` items whose
    costs add up to at most ``max_cost()`` (read for every batch: the limiter learns the budget as it
    goes; ``None`` is no bound) and, if ``kind`` is given, whose items are all of one kind (a request
    cannot mix text prompts and token prompts). An item costlier than the budget goes alone: the
    limiter decides if it can ever pass. Lazy: reads one item past the batch it yields, no more.
    """
    packer = Packer(max_items, max_cost(), kind)
    source = iter(items)
    while True:
        try:
            position, item, cost = next(source)
        except StopIteration:
            break
        except Exception:
            # The input failed (a bad item, a read error): what was read before it still goes out.
            rest = packer.flush()
            if rest is not None:
                yield rest
            raise
        batch = packer.add(position, item, cost)
        if batch is not None:
            yield batch
            packer.budget = max_cost()
    rest = packer.flush()
    if rest is not None:
        yield rest


def split_choices(choices: Sequence[Any], inputs: int, n: int = 1) -> List[Union[List[Any], IncompleteResponse]]:
    """For each of ``inputs`` inputs, its ``n`` answers ordered by sample, found by ``index``.

    Answer ``j`` of input ``i`` has ``index == i * n + j`` (an SDK object's attribute, or a dict's
    key). An input with a missing, duplicated or out-of-range index gets an :class:`IncompleteResponse`
    in its place.
    """
    found: List[List[Any]] = [[None] * n for _ in range(inputs)]
    broken = set()
    for choice in choices:
        index = choice.get("index") if isinstance(choice, dict) else getattr(choice, "index", None)
        if not isinstance(index, int) or not 0 <= index < inputs * n:
            # An index we cannot place spoils nothing we can name; the missing one will show.
            continue
        slot = found[index // n]
        if slot[index % n] is not None:
            broken.add(index // n)
        slot[index % n] = choice
    out: List[Union[List[Any], IncompleteResponse]] = []
    for i, samples in enumerate(found):
        if i in broken:
            out.append(IncompleteResponse(f"the response repeated an answer for input {i} of its batch"))
        elif any(sample is None for sample in samples):
            out.append(IncompleteResponse(f"the response had no answer (of {n}) for input {i} of its batch"))
        else:
            out.append(samples)
    return out
