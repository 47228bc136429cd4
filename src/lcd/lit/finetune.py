r"""Finetuning a pretrained causal LM on natural ICL tasks, restricted to a layer group (PAPER.md §5).

Compose a base, a model, a task, and a strategy fragment; switching early to late is one ``--config``::

    lcd fit --config configs/finetune/base.yaml --config configs/llm/models/gemma3_270m.yaml \
        --config configs/llm/tasks/bitwise.yaml --config configs/finetune/early.yaml

The loss is the next-token cross-entropy on the answer tokens only (the datamodule's ``labels``).
Validation generates greedy answers for every ``eval_shots`` count and logs exact-match accuracy per
concept (``val/shots_04/acc/concept_AND``, ``val/shots_04/acc/mean``; Null prompts are skipped: their
answers are random). CD per layer comes from the :class:`~lcd.callbacks.ConceptDecodability`
callback, which calls :meth:`LitFinetune.probe`.

Checkpoints hold only the trainable parameters (adapters, or the finetuned blocks) plus optimizer and
loop state, so ``--ckpt_path last`` resumes a run without writing the frozen model again. At the end of
fit the trained part is saved to ``<run_dir>/adapter`` (load it with ``model.init_args.adapter``) and,
with ``save_merged``, a merged model to ``<run_dir>/merged`` that any lcd command loads as
``lm.name: <run_dir>/merged``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from lcd.activations import Position, capture_residual, last_token_positions
from lcd.data.text import IGNORE_INDEX
from lcd.finetuning import FinetuneMethod, count_parameters, trainable_parameter_names
from lcd.lit.generation import (
    answer_budget,
    answer_end_token_ids,
    decode_answers,
    exact_match,
    greedy_generate,
    position_ids_from_mask,
)
from lcd.models.hf import CausalLMSpec, LoadedLM
from lcd.rundir import run_dir

__all__ = ["LitFinetune", "export_merged"]


class LitFinetune(L.LightningModule):
    """Finetune (or only evaluate) a pretrained causal LM on k-shot ICL prompts.

    Use with :class:`lcd.data.ICLTextDataModule`. The model is loaded and the method applied in
    ``__init__``, so an unknown model, an empty or out-of-range layer group, or targets that match
    nothing fail before any work (and the ConceptDecodability callback sees the model's depth).

    Args:
        lm: Which model to load (preset, hub name, directory or GGUF; dtype). ``device_map`` must be
            ``null``: Lightning places the model (use DDP or a larger device for bigger models).
        method: Finetuning method with its layer group (``class_path`` of a
            :class:`~lcd.finetuning.FinetuneMethod`); ``None`` trains nothing: the pretrained baseline,
            for ``lcd validate``.
        adapter: Directory of a trained part saved by an earlier run (``<run_dir>/adapter``), loaded with
            ``method`` (which must be the method that wrote it) before training or evaluation.
        save_merged: At the end of fit also write the merged model and tokenizer to ``<run_dir>/merged``.
        max_answer_tokens: Cap on generated tokens per answer; ``None``: longest gold answer + 1.

    """

    def __init__(
        self,
        lm: CausalLMSpec | None = None,
        method: FinetuneMethod | None = None,
        adapter: str | None = None,
        save_merged: bool = False,
        max_answer_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.lm_spec = lm or CausalLMSpec()
        if self.lm_spec.device_map is not None:
            raise ValueError("LitFinetune needs lm.device_map: null (Lightning places the model it trains).")
        if adapter is not None and method is None:
            raise ValueError("adapter given without method: set model.init_args.method to the method that saved it.")
        self.save_hyperparameters(ignore=["lm", "method"])
        self.hparams["lm"] = vars(self.lm_spec)
        self.hparams["method"] = repr(method)
        self.method, self.save_merged, self.max_answer_tokens = method, save_merged, max_answer_tokens
        self.strict_loading = False  # checkpoints carry only the trainable parameters
        loaded: LoadedLM = self.lm_spec.load()
        self.tokenizer = loaded.tokenizer
        self._stop_ids: torch.Tensor | None = None  # tokens that end an answer (validation stops there)
        self.n_layers = loaded.n_layers
        model = loaded.model
        self._keep_logits = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        if method is not None:
            model = method.load(model, adapter) if adapter is not None else method.apply(model)
            model.train()
        else:
            model.requires_grad_(False)
        self.model = model
        self.description = method.describe(model) if method is not None else "pretrained (no finetuning)"
        trainable, total = count_parameters(model)
        self.hparams["trainable_parameters"], self.hparams["total_parameters"] = trainable, total
        self._correct: torch.Tensor | None = None  # (n_eval_shots, n_labels) summed exact matches
        self._count: torch.Tensor | None = None
        self.last_accuracy: dict[int, dict[str, float]] = {}  # shots -> concept name -> accuracy

    def setup(self, stage: str) -> None:
        """Hand the model's tokenizer to the datamodule; check the run can work."""
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "set_tokenizer"):
            raise TypeError("LitFinetune needs an lcd.data.ICLTextDataModule (data: class_path ...).")
        dm.set_tokenizer(self.tokenizer)
        if stage == "fit" and self.method is None:
            raise ValueError("no finetuning method: set model.init_args.method (or run `lcd validate`).")

    # --- the loss: next-token cross-entropy on the answer tokens only -----------------------------------

    def answer_nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed answer-token NLL and answer-token count per row: (B,), (B,).

        Logits are computed only at the positions that predict answer tokens (``logits_to_keep``): with a
        262K-token vocabulary, full-sequence logits would dominate memory and time. The positions go in as
        an index tensor, not a count: indexing gives the head a contiguous input, so its matmul folds into
        one ``mm`` (a strided slice falls back to a batched matmul about 5x slower on the CPU).
        """
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        t = labels.shape[1]
        is_answer = labels != IGNORE_INDEX  # (B, T)
        is_answer[:, 0] = False  # nothing predicts the first token (transformers' shifted loss ignores it too)
        if not is_answer.any():
            raise ValueError("a batch has no answer tokens: the datamodule must give labels (with_answers).")
        first = int(torch.where(is_answer, torch.arange(t, device=ids.device), t).amin())  # earliest answer token
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
        keep = torch.arange(first - 1, t - 1, device=ids.device)  # position p predicts token p + 1
        if self._keep_logits:
            kwargs["logits_to_keep"] = keep
        logits = self.model(**kwargs, use_cache=False).logits
        if not self._keep_logits:
            logits = logits[:, keep]
        b, k, v = logits.shape  # (B, T - first, V)
        targets = labels[:, first:].masked_fill(~is_answer[:, first:], IGNORE_INDEX)  # (B, T - first)
        nll = F.cross_entropy(logits.reshape(b * k, v).float(), targets.reshape(-1), reduction="none")
        nll = nll.view(b, k)  # ignored targets contribute 0
        return nll.sum(1), (targets != IGNORE_INDEX).sum(1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Mean NLL over every answer token of the batch."""
        nll, count = self.answer_nll(batch)
        loss = nll.sum() / count.sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(nll))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW (lr 2e-4) on the trainable parameters; LightningCLI's ``optimizer:`` overrides it."""
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)

    # --- probing interface used by the ConceptDecodability callback ---------------------------------------

    def probe(
        self, batch: dict, layers: list[int] | None = None, position: Position = "query"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual stream at the token before the answer, concept labels and per-example answer loss.

        Args:
            batch: A prompt+answer batch of :meth:`ICLTextDataModule.probe_dataloader`.
            layers: 0-based layers; ``None`` for all.
            position: ``query`` (the last prompt token, right before the answer) or ``last`` (the last
                token of the sequence).

        Returns:
            features (L, B, d_model) in sorted layer order; labels (B,); mean answer-token NLL (B,).

        """
        if position == "query":
            positions = batch["query_position"]
        elif position == "last":
            positions = last_token_positions(batch["attention_mask"])
        else:
            raise ValueError(f"position must be 'query' or 'last' for LitFinetune, got {position!r}.")
        with capture_residual(self.model, layers, positions=positions) as cap:
            nll, count = self.answer_nll(batch)
        return cap.stacked().float(), batch["concept"], nll / count.clamp(min=1)

    # --- validation: greedy exact match per concept and shot count --------------------------------------

    def on_validation_epoch_start(self) -> None:
        """Reset the per-(shots, concept) counters; find the answer-end tokens once per run."""
        if self._stop_ids is None:
            self._stop_ids = answer_end_token_ids(self.tokenizer)
        dm = self.trainer.datamodule
        shape = (len(dm.eval_shots), len(dm.concept_names))
        self._correct = torch.zeros(shape, device=self.device)
        self._count = torch.zeros(shape, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Greedy answers of the non-Null prompts, scored by exact match."""
        null_id = len(self.trainer.datamodule.concept_names) - 1
        keep = (batch["concept"] != null_id).nonzero().squeeze(1)  # Null answers are random: not scored
        if len(keep) == 0:
            return
        answers = [batch["answers"][i] for i in keep.tolist()]
        budget = answer_budget(self.tokenizer, answers)
        if self.max_answer_tokens is not None:
            budget = min(budget, self.max_answer_tokens)
        ids, mask = batch["input_ids"][keep], batch["attention_mask"][keep]
        generated = greedy_generate(self.model, ids, mask, budget, self.tokenizer.pad_token_id, self._stop_ids)
        correct = exact_match(decode_answers(self.tokenizer, generated), answers).to(self.device)
        concept = batch["concept"][keep]
        self._correct[dataloader_idx].index_add_(0, concept, correct.float())
        self._count[dataloader_idx].index_add_(0, concept, torch.ones_like(correct, dtype=torch.float))

    def on_validation_epoch_end(self) -> None:
        """Log ``val/shots_XX/acc/concept_<name>`` and ``val/shots_XX/acc/mean`` (over concepts, no Null)."""
        correct = self.trainer.strategy.reduce(self._correct, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._count, reduce_op="sum")
        dm = self.trainer.datamodule
        names = dm.concept_names[:-1]
        metrics: dict[str, float] = {}
        for i, shots in enumerate(dm.eval_shots):
            if count[i].sum() == 0:
                continue
            acc = (correct[i, : len(names)] / count[i, : len(names)].clamp(min=1)).tolist()
            self.last_accuracy[shots] = dict(zip(names, acc, strict=True))
            prefix = f"val/shots_{shots:02d}/acc"
            metrics.update({f"{prefix}/concept_{name}": a for name, a in zip(names, acc, strict=True)})
            metrics[f"{prefix}/mean"] = sum(acc) / len(acc)
        if metrics:
            self.log_dict(metrics, sync_dist=False)  # already reduced across processes above

    # --- checkpoints and the trained part -------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the trainable parameters in the checkpoint (the frozen model is reloaded from ``lm``)."""
        names = {f"model.{n}" for n in trainable_parameter_names(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Check that the checkpoint holds exactly this run's trainable parameters."""
        expected = {f"model.{n}" for n in trainable_parameter_names(self.model)}
        saved = set(checkpoint["state_dict"])
        if saved != expected:
            diff = sorted(saved ^ expected)[:4]
            raise ValueError(f"checkpoint parameters differ from this run's trainable ones ({diff} ...): same method?")

    def on_fit_end(self) -> None:
        """Save the trained part to ``<run_dir>/adapter`` (and the merged model with ``save_merged``)."""
        if not self.trainer.is_global_zero or self.method is None:
            return
        root = run_dir(self.trainer)
        self.method.save(self.model, root / "adapter")
        if self.save_merged:
            export_merged(self.lm_spec, self.method, root / "adapter", root / "merged")


def export_merged(lm: CausalLMSpec, method: FinetuneMethod, adapter: str | Path, out: str | Path) -> Path:
    """Load ``lm``, attach a saved trained part, merge it, and save model + tokenizer to ``out``.

    The result is a plain ``save_pretrained`` directory (no peft needed), loadable as ``lm.name: <out>``.
    """
    loaded = lm.load()
    model = method.merge(method.load(loaded.model, adapter))
    model.save_pretrained(str(out))
    loaded.tokenizer.save_pretrained(str(out))
    return Path(out)
