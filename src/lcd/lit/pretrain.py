"""Pretraining the synthetic ICL transformer on a task with labelled latent concepts."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import lightning as L
import torch

from lcd.activations import Position, capture_residual
from lcd.models.icl_gpt import ICLTransformer
from lcd.plotting import plot_error_vs_position, save_figure
from lcd.tasks.synthetic.references import reference_errors


class LitPretrain(L.LightningModule):
    """MSE on the y predictions of an :class:`~lcd.models.icl_gpt.ICLTransformer`.

    Logs ``train/loss`` (on the steps the loggers write); at every validation ``val/mse``,
    ``val/mse/concept_<k>`` (each concept's decoding curve), ``val/mse_tail/concept_<k>`` (the last
    ``tail_positions`` context positions) and,
    for every reference algorithm, ``val/ref/<algorithm>/mse_tail/concept_<k>`` plus
    ``val/ratio_true_basis/concept_<k>`` = model tail MSE / r-dim least-squares tail MSE.
    The reference algorithms are run once, on the fixed validation set.

    The optimizer is chosen by LightningCLI's ``optimizer:`` (the configs set the paper's Adam,
    lr 1e-4, betas 0.9/0.9999); outside the CLI the same Adam is the default.

    Args:
        net: The transformer.
        tail_positions: How many final context positions the ``mse_tail`` metrics average over.
        lasso_alpha: L1 penalty of the LASSO reference.
        plot_every_n_steps: Save the error-vs-position plot at the first validation after every
            this many steps (and at the end of fit); 0 disables it.
        compile: Run the training forward pass through ``torch.compile`` (on this 2-core CPU about
            1.3x the training steps/s of the CPU preset, after compiling at the first step: ~30 s, a
            few seconds once torch's on-disk compile cache is warm; on CPU it needs a C++ compiler).
            Only training is compiled: validation, probing and activation capture run the plain
            module, and checkpoints are the same either way.
        probe_position: Where the ConceptDecodability callback reads CD when it is not told:
            ``query`` (the query x token, the paper's) or ``last_y`` (the y token just before it).

    """

    def __init__(
        self,
        net: ICLTransformer,
        tail_positions: int = 3,
        lasso_alpha: float = 0.01,
        plot_every_n_steps: int = 1000,
        compile: bool = False,
        probe_position: Position = "query",
    ) -> None:
        super().__init__()
        # Keep `net` in the hyperparameters: under LightningCLI they hold its config (class_path and
        # init_args), which lets `LitPretrain.load_from_checkpoint(path)` rebuild the network. A net built
        # in Python is stored as the module itself (Lightning warns about that; these models are small).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attribute 'net' is an instance of `nn.Module`")
            self.save_hyperparameters()
        net_config = self.hparams.get("net")
        if isinstance(net_config, dict) and isinstance(net_config.get("init_args"), dict):
            # The CLI links n_dims/n_pairs from the task (lcd.configs.LINKS), and a link's target is not part of
            # the config the CLI hands over: record the sizes the network was built with, for load_from_checkpoint.
            net_config["init_args"].update(n_dims=net.n_dims, n_pairs=net.n_pairs)
        self.net = net
        self.tail_positions = tail_positions
        if probe_position not in ("query", "last_y"):
            raise ValueError(f"probe_position must be 'query' or 'last_y' for LitPretrain, got {probe_position!r}.")
        self.probe_position = probe_position
        self._refs: dict[str, torch.Tensor] | None = None  # algorithm -> (K, n) mean squared error
        self._val_sums: torch.Tensor | None = None  # (K, n) summed squared error
        self._val_counts: torch.Tensor | None = None  # (K,)
        self._last_plot_step = -1
        self._compiled_forward: Callable[..., torch.Tensor] | None = None  # built at the first training step

    def setup(self, stage: str) -> None:
        """Check that the task and the model fit together before any work starts."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "n_dims"):
            return
        if dm.n_dims != self.net.n_dims:
            raise ValueError(
                f"the task has n_dims={dm.n_dims} but the model was built with n_dims={self.net.n_dims}: "
                "set model.net.init_args.n_dims to the task's n_dims (the CLI links them by default)."
            )
        if dm.n_pairs > self.net.n_pairs:
            raise ValueError(
                f"the task has n_pairs={dm.n_pairs} but the model holds at most {self.net.n_pairs}: "
                "raise model.net.init_args.n_pairs."
            )
        if not 1 <= self.tail_positions <= dm.n_pairs:
            raise ValueError(f"tail_positions must be in [1, n_pairs={dm.n_pairs}], got {self.tail_positions}.")

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Predictions (B, n) of every y_i."""
        return self.net(xs, ys)

    def squared_errors(
        self, batch: dict[str, torch.Tensor], forward: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Squared error of every y prediction: (B, n). The loss counts y predictions only."""
        return ((forward or self)(batch["xs"], batch["ys"]) - batch["ys"]) ** 2

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """MSE over all y predictions of the batch."""
        if self.hparams.compile and self._compiled_forward is None:
            # A compiled bound method, not a compiled module: nothing new is registered as a submodule,
            # so parameter names and checkpoints do not change.
            self._compiled_forward = torch.compile(self.net.forward)
        loss = self.squared_errors(batch, self._compiled_forward).mean()
        if self._loggers_write_this_step():
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def _loggers_write_this_step(self) -> bool:
        """Whether Lightning's loggers write on this step (every ``trainer.log_every_n_steps``).

        Logging ``train/loss`` only then leaves the logged curve unchanged (the loggers write only those
        steps) and the progress bar shows the latest of them, while the other steps skip the cost of a
        ``self.log`` call: about 0.4 ms, 2% of a compiled CPU-preset step (README, Performance).
        """
        trainer = self._trainer
        every = trainer.log_every_n_steps if trainer is not None else 0
        return bool(every) and (trainer.global_step + 1) % every == 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The paper's Adam (lr 1e-4, betas 0.9/0.9999); LightningCLI's ``optimizer:`` overrides it."""
        return torch.optim.Adam(self.parameters(), lr=1e-4, betas=(0.9, 0.9999))

    def on_fit_start(self) -> None:
        """Step every lr scheduler after each optimizer step, not each epoch.

        LightningCLI's ``lr_scheduler:`` is registered with Lightning's default interval, ``epoch``, and
        the training stream is infinite, so an epoch never ends and the scheduler would never step.
        ``ReduceLROnPlateau`` is left alone (it follows its monitored validation metric).
        """
        for config in self.trainer.lr_scheduler_configs:
            if not config.reduce_on_plateau:
                config.interval = "step"

    # --- validation: per-concept, per-position error -----------------------------------------------

    def on_validation_epoch_start(self) -> None:
        """Reset the per-concept accumulators."""
        k, n = self._n_concepts(), self.trainer.datamodule.n_pairs
        self._val_sums = torch.zeros(k, n, device=self.device)
        self._val_counts = torch.zeros(k, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate squared errors per concept and position."""
        err = self.squared_errors(batch)  # (B, n)
        self._val_sums.index_add_(0, batch["concept"], err)
        self._val_counts.index_add_(0, batch["concept"], torch.ones_like(batch["concept"], dtype=torch.float))

    def on_validation_epoch_end(self) -> None:
        """Log per-concept curves and reference algorithms; plot error vs position when due."""
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum")
        curve = (sums / counts.clamp(min=1)[:, None]).cpu()  # (K, n) MSE per concept and position
        refs = self._reference_curves()
        tail = slice(-self.tail_positions, None)
        metrics = {"val/mse": (sums.sum() / (counts.sum() * curve.shape[1])).item()}
        for k in range(curve.shape[0]):
            metrics[f"val/mse/concept_{k}"] = curve[k].mean().item()
            metrics[f"val/mse_tail/concept_{k}"] = curve[k, tail].mean().item()
            for name, ref in refs.items():
                metrics[f"val/ref/{name}/mse_tail/concept_{k}"] = ref[k, tail].mean().item()
            if "least_squares_true_basis" in refs:
                denom = refs["least_squares_true_basis"][k, tail].mean().clamp(min=1e-8)
                metrics[f"val/ratio_true_basis/concept_{k}"] = (curve[k, tail].mean() / denom).item()
        self.log_dict(metrics, sync_dist=False)  # already reduced across processes above
        self.last_val_curve = curve
        every = self.hparams.plot_every_n_steps
        if every and not self.trainer.sanity_checking and self.global_step // every > self._last_plot_step // every:
            self._last_plot_step = self.global_step
            self.plot_error_vs_position(curve, refs)

    def on_fit_end(self) -> None:
        """Final error-vs-position plot."""
        if getattr(self, "last_val_curve", None) is not None and self.hparams.plot_every_n_steps:
            self.plot_error_vs_position(self.last_val_curve, self._reference_curves(), final=True)

    def _n_concepts(self) -> int:
        return self.trainer.datamodule.task.n_concepts

    def _reference_curves(self) -> dict[str, torch.Tensor]:
        """Mean squared error per concept and position of each reference algorithm (computed once)."""
        if self._refs is None:
            k = self._n_concepts()
            batches = list(self.trainer.datamodule.val_dataloader())
            concept = torch.cat([b["concept"] for b in batches])
            batch = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
            errors = reference_errors(batch, self.hparams.lasso_alpha)
            self._refs = {}
            for name, err in errors.items():
                sums = torch.zeros(k, err.shape[1]).index_add_(0, concept, err)
                self._refs[name] = sums / torch.bincount(concept, minlength=k).clamp(min=1)[:, None]
        return self._refs

    def plot_error_vs_position(self, curve: torch.Tensor, refs: dict[str, torch.Tensor], final: bool = False) -> None:
        """Save this step's per-concept error-vs-position figure (:func:`lcd.plotting.plot_error_vs_position`)."""
        fig = plot_error_vs_position(curve, refs, self.trainer.datamodule.concept_names, self.global_step)
        save_figure(
            self.trainer, fig, "error_vs_position_final" if final else f"error_vs_position_step{self.global_step:07d}"
        )

    # --- probing interface used by the ConceptDecodability callback ---------------------------------

    def probe(
        self, batch: dict[str, torch.Tensor], layers: Sequence[int] | None = None, position: Position = "query"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual stream at one token of every prompt, concept labels and per-example loss.

        Args:
            batch: A batch from the datamodule.
            layers: 0-based layers; ``None`` for all.
            position: ``query``: the last x token, where the answer is predicted (the paper's choice);
                ``last_y``: the y token just before it.

        Returns:
            features (L, B, d_model) in sorted layer order; labels (B,); per-example MSE (B,) over all
            positions.

        """
        offsets = {"query": 2, "last_y": 3}
        if position not in offsets:
            raise ValueError(f"position must be one of {sorted(offsets)}, got {position!r}.")
        b, n = batch["xs"].shape[:2]
        pos = torch.full((b,), 2 * n - offsets[position], device=batch["xs"].device)
        with capture_residual(self.net, layers, positions=pos) as cap:
            preds = self(batch["xs"], batch["ys"])
        return cap.stacked(), batch["concept"], ((preds - batch["ys"]) ** 2).mean(-1)
