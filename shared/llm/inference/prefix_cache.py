"""Automatic prefix caching over the engine's KV-cache slots (vLLM's automatic prefix caching,
Kwon et al. 2023, section 4.4; SGLang's RadixAttention, Zheng et al. 2024).

Every slot holds one sequence's keys and values for positions 0..n-1, and what a slot
holds stays there after its request ends, until a new request overwrites it. This index
remembers, per slot, which *full blocks* of `block_size` tokens its cache holds, in a
trie keyed by the blocks' tokens: a block is identified by its tokens and every token
before it, exactly (a trie, not a hash, so two different prefixes never collide).

When a request is admitted, `admit` finds the longest run of leading blocks of its prompt
held by any slot, running or free, and picks its slot:

- a free slot that holds that run already: the request reuses it in place;
- else the free slot that costs least: the blocks that no other slot holds, which
  overwriting it loses (a request's own suffix, not the only copy of a shared prefix),
  plus one for each slot it widens the batch by (decode steps run over the slots up to
  the highest busy one: a sparse batch computes idle rows); the narrower, then the least
  recently used, on a tie. When every slot is free (all of a burst of requests ended
  together), the only copy of a long prefix is kept over a narrow batch. The run is
  copied into it from the slot holding it (a copy of a few MB, against a prefill that
  costs the model's full FLOPs per token).

At least the prompt's last token is always computed (its logits give the first new
token), and requests that score their prompt reuse nothing. A slot's blocks from the
reused point on are forgotten when its new request overwrites them: that, and choosing
the slot that loses the fewest blocks, then the least recently used, is the eviction
policy. Blocks are registered as requests
compute them, generated tokens included, so a multi-turn conversation's next prompt
reuses the previous turn's answer too.

A request served with a LoRA adapter computes other keys and values for the same tokens:
each adapter (index 0: the base) has a trie of its own, and `drop_adapter` forgets one
whose index is about to be reused by another adapter.

Memory: no more than the slots themselves; a paged block pool would hold memory per
token instead of per slot, but on the CPU gathering a paged cache for every decode step
costs several times the attention it feeds (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Block:
    """One block of tokens after its parent's, and the slots holding it at its depth."""

    parent: _Block | None
    tokens: tuple[int, ...]
    children: dict[tuple[int, ...], _Block] = field(default_factory=dict)
    slots: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Placement:
    """Where an admitted request goes and what it reuses."""

    slot: int
    cached: int  # prompt tokens whose KV the slot holds (or gets copied) already
    copy_from: int | None = None  # a slot to copy positions [0, cached) from, or in place


class PrefixCache:
    def __init__(self, n_slots: int, block_size: int = 16, enabled: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size, self.enabled = block_size, enabled
        self._roots: dict[int, _Block] = {}  # per adapter index
        self._slot_roots = [self._root(0)] * n_slots  # the trie each slot's path is in
        self._paths: list[list[_Block]] = [[] for _ in range(n_slots)]  # per slot, in order
        self._last_used = [0] * n_slots  # a clock value per slot
        self._clock = 0

    def cached_blocks(self, slot: int) -> int:
        return len(self._paths[slot])

    def admit(
        self, tokens: Sequence[int], free: Sequence[int], busy_width: int, reuse: bool = True,
        adapter: int = 0,
    ) -> Placement:  # fmt: skip
        """Choose a free slot for a prompt and the prefix it reuses (see the module doc).

        Args:
            tokens: the prompt.
            free: the free slots (at least one).
            busy_width: 1 + the highest busy slot (0: none).
            reuse: False for a request that must compute every prompt token.
            adapter: the LoRA adapter index the prompt is computed with (0: the base).
        """
        if not free:
            raise ValueError("no free slot")
        path = self._match(tokens, adapter) if self.enabled and reuse else []
        source = None
        if path:
            holders = path[-1].slots
            in_place = sorted(holders.intersection(free))
            if in_place:  # a free slot holds the whole run: reuse it where it is
                return Placement(in_place[0], len(path) * self.block_size)
            source = min(holders)

        # Else the free slot that costs least: the blocks overwriting it loses, plus one
        # per slot it widens the decode steps by; then the narrower, the least recently
        # used. The run is copied into it.
        def cost(s: int) -> tuple[int, int, int, int]:
            wider = max(0, s + 1 - busy_width)
            return self._lost_blocks(s) + wider, wider, self._last_used[s], s

        slot = min(free, key=cost)
        return Placement(slot, len(path) * self.block_size, source)

    def assign(self, placement: Placement, tokens: Sequence[int], adapter: int = 0) -> None:
        """`placement.slot` now holds `placement.cached` tokens of `tokens` (computed with
        `adapter`), nothing after."""
        slot, keep = placement.slot, placement.cached // self.block_size
        if self._slot_roots[slot] is not self._root(adapter):
            keep = 0  # what it holds was computed with another adapter: only a copy reuses
        self._truncate(slot, 0 if placement.copy_from is not None else keep)
        self._slot_roots[slot] = self._root(adapter)
        if placement.copy_from is not None:
            self._paths[slot] = []
            self.extend(slot, tokens, placement.cached)
        self.touch(slot)

    def extend(self, slot: int, tokens: Sequence[int], computed: int) -> None:
        """The slot's cache now holds `computed` tokens of `tokens`: index its new full blocks."""
        if not self.enabled:
            return
        path, bs = self._paths[slot], self.block_size
        node = path[-1] if path else self._slot_roots[slot]
        for i in range(len(path), computed // bs):
            key = tuple(tokens[i * bs : (i + 1) * bs])
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Block(node, key)
            child.slots.add(slot)
            path.append(child)
            node = child

    def holder(
        self, tokens: Sequence[int], adapter: int = 0, exclude: int = -1
    ) -> tuple[int, int] | None:
        """(a slot other than `exclude` holding the longest cached run of the prompt's
        leading blocks, the run's tokens), or None when no other slot holds any."""
        path = self._match(tokens, adapter) if self.enabled else []
        while path and not (path[-1].slots - {exclude}):
            path.pop()
        if not path:
            return None
        return min(path[-1].slots - {exclude}), len(path) * self.block_size

    def drop_adapter(self, adapter: int) -> None:
        """Forget every block computed with `adapter` (an unloaded adapter's index)."""
        root = self._roots.pop(adapter, None)
        for slot, slot_root in enumerate(self._slot_roots):
            if slot_root is root:
                self._truncate(slot, 0)
                self._slot_roots[slot] = self._root(0)

    def touch(self, slot: int) -> None:
        self._clock += 1
        self._last_used[slot] = self._clock

    # -- internals -----------------------------------------------------------------------

    def _root(self, adapter: int) -> _Block:
        return self._roots.setdefault(adapter, _Block(None, ()))

    def _match(self, tokens: Sequence[int], adapter: int) -> list[_Block]:
        """The trie path of the prompt's leading full blocks, leaving at least one token."""
        bs, node, path = self.block_size, self._root(adapter), []
        for i in range((len(tokens) - 1) // bs):
            node = node.children.get(tuple(tokens[i * bs : (i + 1) * bs]))
            if node is None or not node.slots:
                break
            path.append(node)
        return path

    def _lost_blocks(self, slot: int) -> int:
        """How many blocks only this slot holds (what overwriting it loses)."""
        return sum(len(block.slots) == 1 for block in self._paths[slot])

    def _truncate(self, slot: int, keep: int) -> None:
        path = self._paths[slot]
        while len(path) > keep:
            block = path.pop()
            block.slots.discard(slot)
            # Prune blocks no slot holds and nothing hangs from: the trie stays bounded.
            while block.parent is not None and not block.slots and not block.children:
                del block.parent.children[block.tokens]
                block = block.parent
