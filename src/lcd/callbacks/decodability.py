"""The ConceptDecodability callback: CD per layer, live during training, saved with the checkpoint."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn

from lcd.activations import Position, n_decoder_layers
from lcd.analysis.onsets import concept_onsets, format_onsets
from lcd.decodability import ConceptDecodabilityMetric, Distance, check_knn_settings
from lcd.layers import LayerGroup, select_layers
from lcd.lit.probe_report import duration
from lcd.plotting import plot_cd_heatmap, plot_cd_history, plot_snapshot, save_figure
from lcd.rundir import HISTORY_FILE, ONSETS_FILE, history_row, run_dir, write_history


class ConceptDecodability(L.Callback):
    """Concept Decodability of every layer on a fixed probe set, every N training steps.

    At fit start, every ``every_n_steps`` optimizer steps and at fit end, the module's ``probe`` method
    gives the residual stream at the chosen token of the datamodule's fixed probe set
    (``probe_per_concept`` prompts per concept); CD is the leave-one-out k-NN accuracy of the concept
    from each layer (see :mod:`lcd.decodability`). Logged keys: ``cd/layer_XX``, ``cd/best``,
    ``cd/best_layer``, ``cd/layer_XX/concept_<k>`` and each concept's loss on the same prompts,
    ``probe/loss/concept_<k>``, so encoding and decoding curves share their x axis. A layer x step
    heatmap (``plots/cd_heatmap.png``) is refreshed at every evaluation and logged to W&B.

    History lives in this callback's state, so it is saved in checkpoints and a resumed run continues
    the same curves; it is also rewritten to ``<run_dir>/cd_history.csv`` after every evaluation. At the
    end of fit ``plots/cd_history.png`` shows per-concept loss and CD per layer over steps, and
    ``cd_onsets.txt`` (also printed) says at which step each concept's loss dropped and its CD rose at
    the best layer (:mod:`lcd.analysis.onsets`). Under DDP the probe set is split across processes and
    gathered, so every process scores the same pooled set as a single process would.

    Args:
        every_n_steps: Evaluate every this many optimizer steps (also at fit start and end).
        layers: Layers to score, in the one vocabulary of :mod:`lcd.layers`: ``null`` for all, 0-based
            indices (negative count from the end), or a strategy such as ``lcd.layers.EarlyLayers``.
        position: Which token to read (:data:`lcd.activations.Position`: ``query``, the token right before
            the answer; ``last_y``, synthetic prompts' last y token; ``last``); ``null`` takes the module's
            ``probe_position`` (the synthetic presets set it), else ``query``.
        probe_per_concept: Probe prompts per concept; ``None`` uses the datamodule's default (100).
        k: Neighbours of the leave-one-out k-NN (the paper's 10); must be below the probe prompts per
            concept (checked before training).
        distance: ``euclidean`` (default) or ``cosine``.
        snapshot_steps: Steps at which to save a 2-D view of the representations, coloured by concept.
        snapshot_layers: Layers shown in snapshots; ``None`` for the best layer at that step.
        snapshot_method: ``pca`` or ``umap`` (needs ``umap-learn``).
        progress_every_s: An evaluation that runs longer than this (a pretrained LM on long prompts takes
            minutes) logs a progress line this often (probe batches done, elapsed, time left) and a closing
            line (best CD, its layer, wall time); ``null`` keeps every evaluation silent. Quick evaluations
            (the synthetic presets) print nothing, so the progress bar stays intact.

    """

    def __init__(
        self,
        every_n_steps: int = 250,
        layers: LayerGroup | list[int] | None = None,
        position: Position | None = None,
        probe_per_concept: int | None = None,
        k: int = 10,
        distance: Distance = "euclidean",
        snapshot_steps: list[int] | None = None,
        snapshot_layers: LayerGroup | list[int] | None = None,
        snapshot_method: Literal["pca", "umap"] = "pca",
        progress_every_s: float | None = 60.0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        check_knn_settings(k, distance, probe_per_concept, **_knn_names("ConceptDecodability probe_per_concept"))
        if snapshot_method == "umap":
            try:
                import umap  # noqa: F401
            except ImportError as err:
                raise ValueError("snapshot_method='umap' needs umap-learn: pip install 'lcd[umap]'.") from err
        self.every_n_steps, self.layers, self.position = every_n_steps, layers, position
        self.probe_per_concept, self.k, self.distance = probe_per_concept, k, distance
        self.snapshot_steps = set(snapshot_steps or [])
        self.snapshot_layers, self.snapshot_method = snapshot_layers, snapshot_method
        self.progress_every_s = progress_every_s
        self.history: list[dict[str, float]] = []
        self._layers: list[int] = []
        self._position: str = position or "query"
        self._probe_batches: list | None = None

    # --- setup: fail before any work on a config that cannot work ---------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the module, datamodule and layers; resolve layers against the model's depth."""
        if not hasattr(pl_module, "probe"):
            raise TypeError(f"{type(pl_module).__name__} has no probe(batch, layers, position) method.")
        if not hasattr(trainer.datamodule, "probe_dataloader"):
            raise TypeError("ConceptDecodability needs a datamodule with probe_dataloader(n_per_concept).")
        if self.probe_per_concept is None:  # the datamodule's default probe set (checked in __init__ otherwise)
            option, size = _default_probe_size(trainer.datamodule)
            check_knn_settings(
                self.k, self.distance, size, **_knn_names(option, " (or the callback's probe_per_concept)")
            )
        self._layers = select_layers(self.layers, n_decoder_layers(pl_module))
        self._position = self.position or getattr(pl_module, "probe_position", "query")
        self._probe_batches = None  # built on first use, then reused: the probe set is fixed
        if self.snapshot_layers is not None:
            select_layers(self.snapshot_layers, n_decoder_layers(pl_module))

    # --- when to evaluate -------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score the starting point (skipped when a resumed history already has this step).

        ``on_train_start`` rather than ``on_fit_start``: only here is a resumed step counter restored. A
        resumed run logs the checkpoint's own evaluation again: the loggers hold a step's row until a later
        step is logged, so an interruption right after the checkpoint may have kept it from them (W&B and
        the CSV keep one copy of a step).
        """
        if self.history and self.history[-1]["step"] == trainer.global_step and trainer.is_global_zero:
            self._log_row(trainer, self.history[-1])
            self._write_csv(trainer)
        self._maybe_evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Score every ``every_n_steps`` optimizer steps."""
        if trainer.global_step % self.every_n_steps == 0:
            self._maybe_evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score the final model; save the history plot and the onset table."""
        self._maybe_evaluate(trainer, pl_module)
        if trainer.is_global_zero and self.history:
            save_figure(trainer, plot_cd_history(self.history, self._layers), "cd_history")
        if trainer.is_global_zero and len(self.history) >= 2:
            try:
                table = format_onsets(*concept_onsets(self.history))
            except ValueError as err:  # a summary only: never fail a finished fit over it
                rank_zero_warn(f"no {ONSETS_FILE}: {err}")
                return
            (run_dir(trainer) / ONSETS_FILE).write_text(table + "\n")
            rank_zero_info(table)

    def _maybe_evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (self.history and self.history[-1]["step"] == trainer.global_step):
            return
        self.evaluate(trainer, pl_module)

    # --- the measurement ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Probe every layer now, append to the history, log and save; returns the logged metrics."""
        was_training = pl_module.training
        pl_module.eval()
        metric = ConceptDecodabilityMetric(self.k, self.distance).to(pl_module.device)
        n_concepts = len(trainer.datamodule.concept_names)
        loss_sum = torch.zeros(n_concepts, device=pl_module.device)
        loss_count = torch.zeros(n_concepts, device=pl_module.device)
        snapshot = trainer.global_step in self.snapshot_steps
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self._probe_batches is None:
            self._probe_batches = list(trainer.datamodule.probe_dataloader(self.probe_per_concept))
        start = last_line = time.monotonic()
        for i, batch in enumerate(self._probe_batches):
            if i % trainer.world_size != trainer.global_rank:  # shard the probe set across processes
                continue
            batch = move_data_to_device(batch, pl_module.device)
            features, labels, loss = pl_module.probe(batch, self._layers, position=self._position)
            metric.update(features.float(), labels)
            loss_sum.index_add_(0, labels, loss.float())
            loss_count.index_add_(0, labels, torch.ones_like(loss, dtype=torch.float))
            if snapshot:
                kept.append((features.float().cpu(), labels.cpu()))
            now = time.monotonic()
            if self.progress_every_s is not None and now - last_line >= self.progress_every_s:
                last_line, done, total = now, i + 1, len(self._probe_batches)
                rank_zero_info(
                    f"CD | step {trainer.global_step} | {done}/{total} probe batches | elapsed {duration(now - start)}"
                    f" | left ~{duration((now - start) * (total - done) / done)}"
                )
        result = metric.compute()  # gathers across processes
        loss_sum = trainer.strategy.reduce(loss_sum, reduce_op="sum")
        loss_count = trainer.strategy.reduce(loss_count, reduce_op="sum")
        pl_module.train(was_training)

        row = history_row(
            trainer.global_step,
            self._layers,
            result["cd"],
            result["per_concept"],
            result["classes"],
            loss_sum / loss_count.clamp(min=1),
        )
        best = int(result["cd"].argmax())
        self.history.append(row)
        took = time.monotonic() - start
        if self.progress_every_s is not None and took >= self.progress_every_s:
            rank_zero_info(
                f"CD | step {trainer.global_step} | best {result['cd'][best]:.3f} at layer {self._layers[best]} | "
                f"{int(loss_count.sum())} probe prompts in {duration(took)}"
            )
        if trainer.is_global_zero:
            self._log_row(trainer, row)
            self._write_csv(trainer)
            save_figure(trainer, plot_cd_heatmap(self.history, self._layers), "cd_heatmap")
            if snapshot:
                self._snapshot(trainer, kept, best)
        return row

    def _snapshot(self, trainer: L.Trainer, kept: list[tuple[torch.Tensor, torch.Tensor]], best: int) -> None:
        # Under DDP only rank 0's shard is drawn; the picture is illustrative, the CD numbers are pooled.
        features = torch.cat([f for f, _ in kept], dim=1)  # (L, N, d)
        labels = torch.cat([lab for _, lab in kept])
        layers = self.snapshot_layers if self.snapshot_layers is not None else [self._layers[best]]
        for layer in select_layers(layers, max(self._layers) + 1):
            fig = plot_snapshot(
                features[self._layers.index(layer)], labels, self.snapshot_method, layer, trainer.global_step
            )
            save_figure(trainer, fig, f"snapshot_layer{layer:02d}_step{trainer.global_step:07d}")

    def _log_row(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        metrics = {key: value for key, value in row.items() if key != "step"}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=int(row["step"]))

    def _write_csv(self, trainer: L.Trainer) -> None:
        # Rewritten whole each time, so it always matches the checkpointed history.
        write_history(run_dir(trainer) / HISTORY_FILE, self.history)

    # --- checkpointing ------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        """Unique per configuration, so several instances (e.g. two positions) can share a run."""
        return self._generate_state_key(layers=self.layers, position=self.position, k=self.k, distance=self.distance)

    def state_dict(self) -> dict[str, Any]:
        """The CD history, saved in every checkpoint."""
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history of a resumed run."""
        self.history = list(state_dict.get("history", []))


def _default_probe_size(datamodule: Any) -> tuple[str, int | None]:
    """The datamodule option that sets its default probe set's prompts per concept (and Null), and its value."""
    for name in ("probe_per_concept", "n_per_concept"):  # SyntheticICLDataModule, ICLTextDataModule
        if isinstance(getattr(datamodule, name, None), int):
            return f"data {name}", getattr(datamodule, name)
    return "data probe_per_concept", None


def _knn_names(option: str, alternative: str = "") -> dict[str, str]:
    """Option names for :func:`~lcd.decodability.check_knn_settings`'s messages; ``option`` sets the probe size."""
    return {
        "k_name": "ConceptDecodability k",
        "distance_name": "ConceptDecodability distance",
        "class_name": f"each concept of the probe set ({option})",
        "grow": f"set {option}{alternative} to at least {{n}}",
    }


__all__: Sequence[str] = ["ConceptDecodability"]
