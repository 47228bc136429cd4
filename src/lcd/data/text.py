"""Tokenized k-shot prompts of a natural ICL task (bitwise, POS) for probing and finetuning HF LMs.

Every batch is a dict:

==================  ===========================================================================
``input_ids``       (B, T) left-padded token ids: the prompt, plus the answer if ``with_answers``
``attention_mask``  (B, T) 1 on real tokens
``query_position``  (B,) index of the last prompt token (the token right before the answer),
                    where Concept Decodability is read; ``T - 1`` for prompt-only batches
``concept``         (B,) concept id; ``task.null_id`` (= number of concepts) for Null
``labels``          (B, T) only if ``with_answers``: -100 everywhere except the answer tokens
                    (its closing line break included), for a next-token loss on the answer only
                    (transformers shifts it itself)
``answers``         list of B gold answer strings (``"00100"``)
``first_answer_id`` (B,) the first answer token, i.e. the token the last prompt token should predict
                    (after the leading whitespace moved into the prompt, see below)
``n_shots``         int, demonstrations per prompt
``index``           (B,) only in :meth:`ICLTextDataModule.loader` batches: each row's position in
                    the prompt list (evaluation batches are served longest prompt first)
==================  ===========================================================================

The answer is tokenized separately (its ``target``: ``answer_prefix + answer`` and the line break that
ends it, no special tokens) and appended to the prompt's ids, so the prompt/answer boundary is exact
and the same at training and evaluation time.
Leading answer tokens that decode to whitespace only are moved to the end of the prompt: Gemma, for
instance, tokenizes ``" 00100"`` as ``" ", "0", "0", ...``, and the bare space is formatting, not answer.
The last prompt token (where CD is read and patching writes) is then the one whose output is the first
*content* token of the answer, for every tokenizer alike; the token sequence is unchanged.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lcd.data.stream import stream_loader
from lcd.tasks.text.prompts import ICLPrompt, PromptTemplate, Split, TextICLTask, make_prompts

__all__ = ["FinetuneDataModule", "ICLTextDataModule", "encode_prompts", "prompt_lengths", "tokenize_prompts"]

IGNORE_INDEX = -100


def tokenize_prompts(tokenizer: Any, prompts: Sequence[ICLPrompt]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt and of its answer, split at the exact prompt/answer boundary (unpadded).

    Leading whitespace-only answer tokens are moved to the end of the prompt (see the module docstring).
    """
    prompt_ids = tokenizer([p.text for p in prompts], add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer([p.target for p in prompts], add_special_tokens=False)["input_ids"]
    for i, a in enumerate(answer_ids):
        n_space = 0  # leading whitespace-only answer tokens, kept in the prompt (see the module docstring)
        while n_space < len(a) - 1 and not tokenizer.decode(a[: n_space + 1]).strip():
            n_space += 1
        prompt_ids[i], answer_ids[i] = prompt_ids[i] + a[:n_space], a[n_space:]
    return prompt_ids, answer_ids


def prompt_lengths(tokenizer: Any, prompts: Sequence[ICLPrompt], with_answers: bool = False) -> list[int]:
    """Tokens of each prompt (plus its answer if ``with_answers``) as :func:`encode_prompts` lays it out, unpadded."""
    prompt_ids, answer_ids = tokenize_prompts(tokenizer, prompts)
    return [len(q) + (len(a) if with_answers else 0) for q, a in zip(prompt_ids, answer_ids, strict=True)]


def encode_prompts(
    tokenizer: Any, prompts: Sequence[ICLPrompt], with_answers: bool = False, max_length: int | None = None
) -> dict[str, Any]:
    """Tokenize and left-pad prompts into one batch (see the module docstring for the keys).

    Args:
        tokenizer: A Hugging Face tokenizer with a pad token.
        prompts: The prompts.
        with_answers: Append each prompt's answer tokens and add ``labels``.
        max_length: Raise if a sequence is longer (prompts are never silently truncated).

    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos token).")
    prompt_ids, answer_ids = tokenize_prompts(tokenizer, prompts)
    seqs = [q + a for q, a in zip(prompt_ids, answer_ids, strict=True)] if with_answers else prompt_ids
    t = max(len(s) for s in seqs)
    if max_length is not None and t > max_length:
        raise ValueError(f"a prompt has {t} tokens, more than max_length={max_length}: use fewer shots.")
    ids = torch.full((len(seqs), t), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    labels = torch.full((len(seqs), t), IGNORE_INDEX, dtype=torch.long)
    query = torch.empty(len(seqs), dtype=torch.long)
    for i, (seq, a) in enumerate(zip(seqs, answer_ids, strict=True)):
        ids[i, t - len(seq) :] = torch.tensor(seq)  # left padding: every sequence ends at T - 1
        mask[i, t - len(seq) :] = 1
        query[i] = t - 1 - (len(a) if with_answers else 0)
        if with_answers:
            labels[i, t - len(a) :] = torch.tensor(a)
    batch: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "query_position": query,
        "concept": torch.tensor([p.concept for p in prompts]),
        "answers": [p.answer for p in prompts],
        "first_answer_id": torch.tensor([a[0] for a in answer_ids]),
        "n_shots": prompts[0].n_shots,
    }
    if with_answers:
        batch["labels"] = labels
    return batch


def _encode_indexed(
    tokenizer: Any, prompts: list[ICLPrompt], with_answers: bool, max_length: int | None, indices: list[int]
) -> dict[str, Any]:
    batch = encode_prompts(tokenizer, [prompts[i] for i in indices], with_answers, max_length)
    batch["index"] = torch.tensor(indices)  # (B,) positions in the loader's prompt list
    return batch


class ICLTextDataModule(L.LightningDataModule):
    """k-shot prompts of a :class:`~lcd.tasks.text.prompts.TextICLTask`, tokenized for a causal LM.

    Evaluation: one validation dataloader per entry of ``eval_shots`` (``dataloader_idx`` i is
    ``eval_shots[i]`` shots), each ``n_per_concept`` prompts per concept (plus as many Null prompts)
    with queries from ``eval_split``; the same queries at every shot count. Training: ``n_train``
    prompt+answer sequences at ``train_shots`` shots, queries from the train split, concepts balanced,
    no Null (its answers are random). ``probe_dataloader`` serves the ConceptDecodability callback.

    The tokenizer belongs to the model, so the LightningModule hands it over with
    :meth:`set_tokenizer` in its ``setup`` (before any dataloader is built).

    Args:
        task: The task family (``class_path`` of a TextICLTask).
        eval_shots: Shot counts evaluated (the paper's 1, 4 and 10).
        n_per_concept: Evaluation prompts per concept (the paper's 100).
        eval_split: Split of the evaluation queries; ``test`` unless you are developing prompts.
        include_null: Add the Null class to evaluation and probe sets.
        train_shots: Shots of the training prompts (the paper's 4).
        n_train: Training prompts (the paper's 10K).
        probe_shots: Shots of the probe set; ``None`` uses ``train_shots``.
        batch_size: Training batch size.
        eval_batch_size: Evaluation and probe batch size.
        name_concept: Start every prompt with a line naming its concept (PAPER.md §5's control).
        template: Prompt template; ``None`` for the default :class:`~lcd.tasks.text.prompts.PromptTemplate`.
        max_length: Longest allowed sequence in tokens; ``None`` for no limit.
        seed: Seed of every prompt set and of the training order.

    Raises:
        ValueError: if a class has fewer than ``n_per_concept`` distinct queries in ``eval_split``, or too
            few train inputs for the largest shot count (:meth:`~lcd.tasks.text.prompts.TextICLTask.check_pools`):
            checked here, before any model loads. Training prompts may repeat queries (with other demonstrations).

    """

    def __init__(
        self,
        task: TextICLTask,
        eval_shots: list[int] | None = None,
        n_per_concept: int = 100,
        eval_split: Split = "test",
        include_null: bool = True,
        train_shots: int = 4,
        n_train: int = 10_000,
        probe_shots: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        name_concept: bool = False,
        template: PromptTemplate | None = None,
        max_length: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.eval_shots = list(eval_shots) if eval_shots is not None else [1, 4, 10]
        if not self.eval_shots or min(self.eval_shots) < 0 or train_shots < 0:
            raise ValueError(f"shot counts must be >= 0 and eval_shots non-empty, got {self.eval_shots}.")
        if min(n_per_concept, n_train, batch_size, eval_batch_size) < 1:
            raise ValueError("n_per_concept, n_train, batch_size and eval_batch_size must be >= 1.")
        self.task, self.n_per_concept, self.eval_split = task, n_per_concept, eval_split
        self.include_null, self.train_shots, self.n_train = include_null, train_shots, n_train
        self.probe_shots = train_shots if probe_shots is None else probe_shots
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.name_concept, self.template, self.max_length, self.seed = name_concept, template, max_length, seed
        self.tokenizer: Any = None
        self._cache: dict[tuple, list[ICLPrompt]] = {}
        classes = range(task.null_id + 1 if include_null else task.n_concepts)
        shots = max(*self.eval_shots, train_shots, self.probe_shots)
        task.check_pools(n_per_concept, shots, eval_split, distinct_queries=True, concepts=classes)

    @property
    def concept_names(self) -> list[str]:
        """Names of every label a batch can carry: the task's concepts, then Null."""
        return self.task.label_names

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use the model's tokenizer (left padding is enforced)."""
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer

    def prompts(
        self, n_shots: int, split: Split, n_per_concept: int, include_null: bool, stream: int = 0
    ) -> list[ICLPrompt]:
        """A cached, seeded prompt set (``stream`` separates sets that must differ)."""
        key = (n_shots, split, n_per_concept, include_null, stream)
        if key not in self._cache:
            self._cache[key] = make_prompts(
                self.task,
                n_shots,
                n_per_concept,
                split,
                seed=self.seed * 1000 + stream,
                include_null=include_null,
                template=self.template,
                name_concept=self.name_concept,
            )
        return self._cache[key]

    def eval_prompts(self, n_shots: int) -> list[ICLPrompt]:
        """The evaluation prompts at ``n_shots`` shots."""
        return self.prompts(n_shots, self.eval_split, self.n_per_concept, self.include_null)

    def train_prompts(self) -> list[ICLPrompt]:
        """``n_train`` training prompts in a seeded random order (Null excluded)."""
        per = math.ceil(self.n_train / self.task.n_concepts)
        prompts = list(self.prompts(self.train_shots, "train", per, include_null=False, stream=1))
        random.Random(f"train-order/{self.seed}").shuffle(prompts)
        return prompts[: self.n_train]

    def loader(
        self,
        prompts: Sequence[ICLPrompt],
        batch_size: int | None = None,
        with_answers: bool = False,
        by_length: bool = True,
    ) -> DataLoader:
        """Batches of ``prompts`` tokenized by :func:`encode_prompts`, each with an ``index`` key.

        Args:
            prompts: The prompts.
            batch_size: Prompts per batch; ``None`` for ``eval_batch_size``.
            with_answers: Append the answers (see :func:`encode_prompts`).
            by_length: Serve the prompts longest first, so every batch holds prompts of similar token
                length and left padding stays small (real 10-shot prompts vary by +-25%). Per-prompt
                results do not depend on the order; ``index`` (B,) gives each row's position in ``prompts``
                to map them back. ``False`` keeps the given order.

        """
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer yet: call set_tokenizer(model_tokenizer) first.")
        prompts = list(prompts)
        order = list(range(len(prompts)))
        if by_length:  # longest first (a sequence too long for memory fails at once); stable for equal lengths
            lengths = prompt_lengths(self.tokenizer, prompts, with_answers)
            order.sort(key=lambda i: -lengths[i])
        return DataLoader(
            order,
            batch_size=batch_size or self.eval_batch_size,
            shuffle=False,
            collate_fn=partial(_encode_indexed, self.tokenizer, prompts, with_answers, self.max_length),
        )

    def train_dataloader(self) -> DataLoader:
        """Prompt+answer sequences with ``labels`` on the answer tokens only."""
        return self.loader(self.train_prompts(), self.batch_size, with_answers=True, by_length=False)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader of prompt-only batches per entry of ``eval_shots``, longest prompts first."""
        return [self.loader(self.eval_prompts(k)) for k in self.eval_shots]

    def probe_dataloader(self, n_per_concept: int | None = None) -> DataLoader:
        """Prompt+answer batches at ``probe_shots`` shots (Null included) for the CD callback."""
        prompts = self.prompts(
            self.probe_shots, self.eval_split, n_per_concept or self.n_per_concept, self.include_null, stream=2
        )
        return self.loader(prompts, with_answers=True)


class FinetuneDataModule(ICLTextDataModule):
    """k-shot prompts for finetuning, with a training stream that resumes mid-pass.

    :class:`ICLTextDataModule` serves the ``n_train`` training prompts as one ordinary epoch, which a run
    resumed from a mid-epoch checkpoint would restart from its first batch. Here training batch ``i`` is
    always batch ``i mod n_batches`` of the same seeded prompt order (cycling over the ``n_train``
    prompts), served by the shared :mod:`lcd.data.stream`: a resumed or DDP run sees exactly the batches
    of one uninterrupted process. Training length is set by ``trainer.max_steps`` (``n_train /
    batch_size`` steps is one pass over the prompts).

    Arguments are those of :class:`ICLTextDataModule`.
    """

    def train_dataloader(self) -> DataLoader:
        """Prompt+answer batches cycling over the training prompts, starting where a resumed run stopped."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer yet: call set_tokenizer(model_tokenizer) first.")
        prompts = self.train_prompts()
        n_batches = math.ceil(len(prompts) / self.batch_size)
        collate = partial(encode_prompts, self.tokenizer, with_answers=True, max_length=self.max_length)

        def batch(index: int) -> dict[str, Any]:
            b = index % n_batches
            return collate(list(prompts[b * self.batch_size : (b + 1) * self.batch_size]))

        return stream_loader(batch, self.trainer)
