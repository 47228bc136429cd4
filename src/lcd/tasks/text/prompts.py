r"""Natural-language ICL tasks with labelled concepts, and the one k-shot prompt template of lcd.

A :class:`TextICLTask` (bitwise arithmetic, POS tagging) holds a pool of raw inputs per split and knows
the answer of every input under each concept. :func:`make_prompts` turns it into k-shot prompts whose
demonstrations and query share one concept; the extra *Null* class (id ``n_concepts``) is built the
same way, with every answer (demos and query) a random valid-looking answer, so Null prompts look
like task prompts but carry no concept (PAPER.md §4).

Template (the paper does not publish its own; this one is used for every task and model)::

    Input: 01101 10110
    Output: 00100

    Input: 11100 00111
    Output:

Demonstrations are ``Input: <x>\nOutput: <y>`` blocks separated by a blank line; the prompt ends with
``Output:`` and the answer continues it after one space, so the token before the answer (where CD is
measured) is the last prompt token. An answer ends at the line break (:data:`ANSWER_END`) that starts
the separator: generation reads the answer up to it, and finetuning targets include it, so a finetuned
model learns where to stop as well as what to answer. Optionally an instruction line naming the
concept comes first (``Task: <description>``), for the "prompt names the concept" condition of
PAPER.md §5.

Splits: queries come from the requested split; demonstrations always come from the train split, so a
test query never appears in any prompt built from the train split. A task may give each class its own
pool within a split (:meth:`TextICLTask.concept_items`, e.g. POS sentences that contain the prompt's
tag); by default every class draws from the whole split. :meth:`TextICLTask.pool_sizes` counts the
pools and :meth:`TextICLTask.check_pools` refuses a prompt set they cannot fill, naming the class.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Split = Literal["train", "test"]

__all__ = ["ANSWER_END", "ICLPrompt", "PromptTemplate", "Split", "TextICLTask", "make_prompts"]

ANSWER_END = "\n"  # ends every answer: in the demonstrations (the separator starts with it) and in targets


@dataclass(frozen=True)
class ICLPrompt:
    """One k-shot prompt.

    Attributes:
        text: The prompt, ending right before the answer (at ``Output:``).
        answer: The gold answer (for Null: the random answer drawn for the query).
        target: The continuation the model should produce, ``answer_prefix + answer + ANSWER_END``
            (e.g. ``" 00100"`` and a line break): the line break that ends the answer is part of it.
        concept: Concept id; ``n_concepts`` for Null.
        n_shots: Number of demonstrations.
        query: The query input as shown in the prompt.

    """

    text: str
    answer: str
    target: str
    concept: int
    n_shots: int
    query: str


@dataclass(frozen=True)
class PromptTemplate:
    """The k-shot template (see the module docstring for an example).

    Args:
        input_prefix: Written before every input.
        output_prefix: Written on the line after every input; the prompt ends with it.
        answer_prefix: Between ``output_prefix`` and the answer.
        separator: Between consecutive examples; starts with :data:`ANSWER_END`, which ends every answer.
        instruction: Format of the optional first line naming the concept.

    Raises:
        ValueError: ``separator`` does not start with :data:`ANSWER_END`.

    """

    input_prefix: str = "Input: "
    output_prefix: str = "Output:"
    answer_prefix: str = " "
    separator: str = "\n\n"
    instruction: str = "Task: {description}"

    def __post_init__(self) -> None:
        if not self.separator.startswith(ANSWER_END):
            raise ValueError(
                f"PromptTemplate.separator must start with {ANSWER_END!r} (it ends every demonstration's answer, "
                f"and generated answers are read up to it), got {self.separator!r}: e.g. use '\\n\\n'."
            )

    def example(self, x: str, y: str) -> str:
        """One demonstration block."""
        return f"{self.input_prefix}{x}\n{self.output_prefix}{self.answer_prefix}{y}"

    def query(self, x: str) -> str:
        """The final, unanswered block."""
        return f"{self.input_prefix}{x}\n{self.output_prefix}"

    def build(self, demos: Sequence[tuple[str, str]], query: str, description: str | None = None) -> str:
        """Join demonstrations and query; prefix the instruction line when ``description`` is given."""
        blocks = [self.example(x, y) for x, y in demos] + [self.query(query)]
        if description is not None:
            blocks.insert(0, self.instruction.format(description=description))
        return self.separator.join(blocks)


class TextICLTask(ABC):
    """A natural ICL task family: labelled concepts over a pool of inputs with disjoint seeded splits.

    Subclasses provide the split pools and the answer of an input under a concept; everything else
    (prompts, Null, batching) is generic.
    """

    null_name = "Null"

    @property
    @abstractmethod
    def concept_names(self) -> list[str]:
        """Names of the task's concepts, indexed by concept id (Null excluded)."""

    @property
    def concept_descriptions(self) -> list[str]:
        """What each concept asks for, used when the prompt names the concept; defaults to the names."""
        return list(self.concept_names)

    @property
    def n_concepts(self) -> int:
        """Number of concepts (Null excluded)."""
        return len(self.concept_names)

    @property
    def null_id(self) -> int:
        """Concept id of the Null class: ``n_concepts``."""
        return self.n_concepts

    @property
    def label_names(self) -> list[str]:
        """Names of every class a prompt can carry: the concepts, then Null."""
        return [*self.concept_names, self.null_name]

    @abstractmethod
    def split_items(self, split: Split) -> Sequence[Any]:
        """The raw inputs of a split; train and test never share an input."""

    @abstractmethod
    def format_input(self, item: Any) -> str:
        """The input as written in the prompt."""

    @abstractmethod
    def answer(self, item: Any, concept: int) -> str:
        """The answer to ``item`` under ``concept`` (0 <= concept < n_concepts)."""

    @abstractmethod
    def null_answer(self, item: Any, rng: random.Random) -> str:
        """A random answer of the right form for ``item`` (the Null class)."""

    def answer_or_null(self, item: Any, concept: int, rng: random.Random) -> str:
        """``answer`` for a real concept, ``null_answer`` for Null."""
        return self.null_answer(item, rng) if concept == self.null_id else self.answer(item, concept)

    def concept_items(self, split: Split, concept: int) -> Sequence[Any]:
        """The inputs of ``split`` that prompts of class ``concept`` (Null: ``null_id``) may use.

        Queries of a class come from its pool in the query split, demonstrations from its pool in the
        train split. Default: the whole split, for every class.
        """
        return self.split_items(split)

    def pool_sizes(self) -> dict[str, dict[str, int]]:
        """Inputs each class (Null included) can use per split: ``{name: {"train": n, "test": n}}``."""
        return {
            name: {split: len(self.concept_items(split, c)) for split in ("train", "test")}
            for c, name in enumerate(self.label_names)
        }

    @property
    def input_noun(self) -> str:
        """What an input is called in messages (plural), e.g. ``"sentences"``."""
        return "inputs"

    @property
    def too_few_advice(self) -> str:
        """How to fix a pool too small for the requested prompts (ends a :meth:`check_pools` message)."""
        return "ask for fewer prompts per concept (data n_per_concept) or fewer shots, or give the task more inputs"

    def check_pools(
        self,
        n_per_concept: int,
        n_shots: int,
        split: Split = "test",
        distinct_queries: bool = True,
        concepts: Sequence[int] | None = None,
    ) -> None:
        """Refuse a prompt set that a class's pool cannot fill.

        A class needs at least ``n_per_concept`` query inputs in ``split`` (with ``distinct_queries``; else
        at least one, and queries repeat with other demonstrations) and more than ``n_shots`` train inputs
        (demonstrations are distinct and never the query).

        Args:
            n_per_concept: Prompts per class.
            n_shots: Demonstrations per prompt (the largest shot count asked for).
            split: Where the queries come from.
            distinct_queries: Require a different query input for every prompt of a class.
            concepts: Class ids to check (Null: ``null_id``); ``None``: every concept and Null.

        Raises:
            ValueError: naming the first class that has too few inputs, its count, the split and the fix.

        """
        concepts = range(self.null_id + 1) if concepts is None else concepts
        for c in concepts:
            name, noun = self.label_names[c], self.input_noun
            n_queries, n_demos = len(self.concept_items(split, c)), len(self.concept_items("train", c))
            if n_queries == 0 or (distinct_queries and n_queries < n_per_concept):
                wanted = f"{n_per_concept} prompts with distinct queries" if distinct_queries else "any prompt"
                raise ValueError(
                    f"{type(self).__name__}: {name} has {n_queries} {split} {noun}, too few for {wanted}: "
                    f"{self.too_few_advice}."
                )
            if n_demos <= n_shots:
                raise ValueError(
                    f"{type(self).__name__}: {name} has {n_demos} train {noun}, too few for {n_shots}-shot prompts "
                    f"(need {n_shots + 1}: distinct demonstrations, never the query): {self.too_few_advice}."
                )


def _seed(*parts: object) -> str:
    # random.Random(str) hashes the string with SHA-512: stable across runs and PYTHONHASHSEED.
    return "/".join(map(str, parts))


def make_prompts(
    task: TextICLTask,
    n_shots: int,
    n_per_concept: int,
    split: Split = "test",
    seed: int = 0,
    include_null: bool = True,
    template: PromptTemplate | None = None,
    name_concept: bool = False,
    concepts: Sequence[int] | None = None,
) -> list[ICLPrompt]:
    """Concept-balanced k-shot prompts, grouped by concept.

    Each concept's queries are drawn from its pool in ``split`` (:meth:`TextICLTask.concept_items`)
    without replacement, so they are distinct while ``n_per_concept`` does not exceed the pool; beyond
    it they cycle through a fresh shuffle (training sets may; ``ICLTextDataModule`` refuses evaluation
    sets that would, through :meth:`TextICLTask.check_pools`). Queries are drawn independently of
    ``n_shots``, so the same queries are probed at every shot count. Demonstrations are drawn from the
    concept's pool in the train split (distinct, never the query itself) and answered under the same
    concept as the query.

    Args:
        task: The task family.
        n_shots: Demonstrations per prompt (0 gives zero-shot prompts).
        n_per_concept: Prompts per concept.
        split: Where queries come from.
        seed: Seed of the query order and the demonstrations.
        include_null: Add ``n_per_concept`` Null prompts (concept id ``task.null_id``).
        template: The prompt template; the default :class:`PromptTemplate` if ``None``.
        name_concept: Start each prompt with an instruction line naming its concept.
        concepts: Concept ids to build (Null may be included as ``task.null_id``); overrides
            ``include_null``. ``None``: every concept.

    Raises:
        ValueError: for a negative shot count, a class with an empty query pool, or too small a train pool
            for ``n_shots`` (:meth:`TextICLTask.check_pools` with ``distinct_queries=False``).

    """
    template = template or PromptTemplate()
    if n_shots < 0 or n_per_concept < 1:
        raise ValueError(f"need n_shots >= 0 and n_per_concept >= 1, got {n_shots} and {n_per_concept}.")
    if concepts is None:
        concepts = list(range(task.n_concepts)) + ([task.null_id] if include_null else [])
    for c in concepts:
        if not 0 <= c <= task.null_id:
            raise ValueError(f"concept id {c} is out of range: use 0..{task.null_id} ({task.label_names}).")
    task.check_pools(n_per_concept, n_shots, split, distinct_queries=False, concepts=concepts)
    prompts = []
    for c in concepts:
        pool, demo_pool = task.concept_items(split, c), task.concept_items("train", c)
        order_rng = random.Random(_seed(seed, split, "order", c))
        order: list[int] = []
        while len(order) < n_per_concept:
            order += order_rng.sample(range(len(pool)), len(pool))
        for i, q in enumerate(order[:n_per_concept]):
            rng = random.Random(_seed(seed, split, "demos", c, i, n_shots))
            query = pool[q]
            demos: list[Any] = []
            while len(demos) < n_shots:  # demos distinct from each other and from the query
                cand = demo_pool[rng.randrange(len(demo_pool))]
                if cand != query and cand not in demos:
                    demos.append(cand)
            shown = [(task.format_input(d), task.answer_or_null(d, c, rng)) for d in demos]
            answer = task.answer_or_null(query, c, rng)
            description = None
            if name_concept:
                description = "random" if c == task.null_id else task.concept_descriptions[c]
            text = template.build(shown, task.format_input(query), description)
            prompts.append(
                ICLPrompt(
                    text, answer, template.answer_prefix + answer + ANSWER_END, c, n_shots, task.format_input(query)
                )
            )
    return prompts
