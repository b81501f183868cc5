"""Paged KV block bookkeeping: pure Python, never touches torch (the model runner owns the tensors).

A block holds ``block_size`` token positions for every layer and every KV head the rank owns; the
migration unit (one KV head of one block, docs/architecture.md#resident-weights-and-communicators) is addressed as ``(block_id, head)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple


class Reservation(NamedTuple):
    """Result of growing a sequence's block table: the full table and the blocks just added."""

    block_table: list[int]
    new_blocks: list[int]


class KVBlockPool(ABC):
    """Allocator interface for KV blocks owned by one rank."""

    block_size: int

    @abstractmethod
    def num_free(self) -> int: ...

    @abstractmethod
    def can_reserve(self, seq_id: str, num_tokens: int) -> bool: ...

    @abstractmethod
    def reserve(self, seq_id: str, num_tokens: int) -> Reservation: ...

    @abstractmethod
    def release(self, seq_id: str) -> list[int]: ...

    @abstractmethod
    def block_table(self, seq_id: str) -> list[int]: ...


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager(KVBlockPool):
    """Free-list block allocator: each sequence owns a list of block ids covering its tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Reversed so that pop() hands out low ids first (easier to read in logs and tests).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}

    def num_free(self) -> int:
        return len(self._free)

    def _missing(self, seq_id: str, num_tokens: int) -> int:
        have = len(self._tables.get(seq_id, ()))
        return max(0, blocks_needed(num_tokens, self.block_size) - have)

    def can_reserve(self, seq_id: str, num_tokens: int) -> bool:
        return self._missing(seq_id, num_tokens) <= len(self._free)

    def reserve(self, seq_id: str, num_tokens: int) -> Reservation:
        """Make the sequence's table cover ``num_tokens`` positions; raise MemoryError if it can't."""
        missing = self._missing(seq_id, num_tokens)
        if missing > len(self._free):
            raise MemoryError(f"need {missing} KV blocks for {seq_id}, {len(self._free)} free")
        table = self._tables.setdefault(seq_id, [])
        new = [self._free.pop() for _ in range(missing)]
        table.extend(new)
        return Reservation(table, new)

    def adopt(self, seq_id: str, table: list[int]) -> None:
        """Give ``seq_id`` exactly these blocks (chosen by a migration plan); they must be free."""
        free = set(self._free)
        if seq_id in self._tables or not free.issuperset(table) or len(set(table)) != len(table):
            raise ValueError(f"cannot adopt blocks {table} for {seq_id}: taken, repeated or unknown")
        taken = set(table)
        self._free = [b for b in self._free if b not in taken]
        self._tables[seq_id] = list(table)

    def release(self, seq_id: str) -> list[int]:
        table = self._tables.pop(seq_id, [])
        self._free.extend(reversed(table))
        return table

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])
