"""Bitwise arithmetic (PAPER.md §4): AND, NAND, OR, NOR, XOR, XNOR on two n-digit binary numbers.

Input ``"01101 10110"``, answer the n-digit result (``"00100"`` under AND). Null: a random n-digit
answer. The splits partition the operand pairs: a test query's pair ``(a, b)`` never occurs in the
train split, so no train prompt (query or demonstration) shows it under any operation. With 5 digits
there are only 1,024 pairs; the default holds 100 out for test (100 test queries per concept, 600 in
all), and the paper's 10K training samples are 10K prompts drawn from the 924 train pairs with fresh
demonstrations each (see :class:`lcd.data.ICLTextDataModule`).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lcd.tasks.text.prompts import Split, TextICLTask

__all__ = ["BITWISE_OPERATIONS", "BitwiseTask"]

# name -> (a, b, mask) -> result; mask has n_digits ones, so NOT is ``~x & mask``.
BITWISE_OPERATIONS: dict[str, Callable[[int, int, int], int]] = {
    "AND": lambda a, b, m: a & b,
    "NAND": lambda a, b, m: ~(a & b) & m,
    "OR": lambda a, b, m: a | b,
    "NOR": lambda a, b, m: ~(a | b) & m,
    "XOR": lambda a, b, m: a ^ b,
    "XNOR": lambda a, b, m: ~(a ^ b) & m,
}

_DESCRIPTIONS = {
    "AND": "bitwise AND of the two numbers",
    "NAND": "bitwise NAND of the two numbers",
    "OR": "bitwise OR of the two numbers",
    "NOR": "bitwise NOR of the two numbers",
    "XOR": "bitwise XOR of the two numbers",
    "XNOR": "bitwise XNOR of the two numbers",
}


class BitwiseTask(TextICLTask):
    """Six bitwise operations on pairs of n-digit binary numbers, with disjoint seeded splits.

    Args:
        n_digits: Digits of each operand and of the answer (the paper's 5).
        n_test_pairs: Operand pairs held out for the test split.
        operations: Which operations are concepts, in concept-id order (default all six).
        seed: Seed of the split.

    """

    def __init__(
        self,
        n_digits: int = 5,
        n_test_pairs: int = 100,
        operations: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        if not 1 <= n_digits <= 16:
            raise ValueError(f"n_digits must be in 1..16, got {n_digits}.")
        n_pairs = 4**n_digits
        if not 1 <= n_test_pairs < n_pairs - 10:
            raise ValueError(f"n_test_pairs must be in 1..{n_pairs - 11} for {n_digits} digits, got {n_test_pairs}.")
        ops = list(operations) if operations is not None else list(BITWISE_OPERATIONS)
        unknown = [op for op in ops if op not in BITWISE_OPERATIONS]
        if unknown or len(ops) < 2 or len(set(ops)) != len(ops):
            raise ValueError(f"operations must be >= 2 distinct names from {list(BITWISE_OPERATIONS)}, got {ops}.")
        self.n_digits, self.operations, self.seed = n_digits, ops, seed
        self._mask = (1 << n_digits) - 1
        pairs = [(a, b) for a in range(1 << n_digits) for b in range(1 << n_digits)]
        random.Random(f"bitwise/{n_digits}/{seed}").shuffle(pairs)
        self._splits: dict[str, list[tuple[int, int]]] = {"test": pairs[:n_test_pairs], "train": pairs[n_test_pairs:]}

    @property
    def concept_names(self) -> list[str]:
        """The operations, in concept-id order."""
        return list(self.operations)

    @property
    def concept_descriptions(self) -> list[str]:
        """E.g. ``"bitwise AND of the two numbers"``."""
        return [_DESCRIPTIONS[op] for op in self.operations]

    def split_items(self, split: Split) -> list[tuple[int, int]]:
        """Operand pairs ``(a, b)`` of the split."""
        return self._splits[split]

    def _bits(self, x: int) -> str:
        return format(x, f"0{self.n_digits}b")

    def format_input(self, item: tuple[int, int]) -> str:
        """``"01101 10110"``."""
        return f"{self._bits(item[0])} {self._bits(item[1])}"

    def answer(self, item: tuple[int, int], concept: int) -> str:
        """The n-digit result of the concept's operation."""
        return self._bits(BITWISE_OPERATIONS[self.operations[concept]](item[0], item[1], self._mask))

    def null_answer(self, item: tuple[int, int], rng: random.Random) -> str:
        """A uniformly random n-digit string."""
        return self._bits(rng.randrange(1 << self.n_digits))
