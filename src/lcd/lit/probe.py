r"""Probing a pretrained causal LM on natural ICL tasks: CD per layer vs shots, accuracy, R², patching.

Run it as a validation::

    lcd validate --config configs/llm/probe.yaml --config configs/llm/models/gemma3_270m.yaml \\
        --config configs/llm/tasks/bitwise.yaml [--config configs/llm/patching.yaml]

For every shot count of the datamodule (``eval_shots``, one validation dataloader each, longest prompts
first so batches carry little padding), one batched forward pass per batch captures the residual stream
of every layer at the token before the answer and fills the KV cache from which the greedy answer is
generated, stopping once every row has ended its answer with a line break
(:func:`lcd.lit.generation.capture_and_generate`). As each shot count finishes: CD per layer (leave-one-out
10-NN over the concepts and Null), the best layer, per-concept CD there, exact-match accuracy per concept,
and the linear fit of accuracy on per-concept CD (R²); its files are (re)written then, so a run stopped
midway keeps every finished shot count. At the end: R² pooled over shot counts, optionally
mean-activation patching at one shot count (:func:`lcd.patching.llm_patching`), and the logger metrics.

Watching a run: when stdout is not a terminal (output to a file, a job log) or the progress bar is off,
a progress line is logged every ``progress_every_s`` seconds (shot count, prompts done, tokens/s, elapsed,
time left for the whole probe, patching included); each finished shot count prints a short table (best
layer, CD there, mean accuracy, R², per-concept CD / accuracy / n). It replaces Lightning's metric table
(one per dataloader, every metric repeated in each); the metrics still reach the loggers.

Outputs: W&B/CSV logger keys ``probe/shots_04/cd/layer_05``, ``probe/shots_04/cd/best``,
``probe/shots_04/cd/best_layer``, ``probe/shots_04/cd/concept_AND``, ``probe/shots_04/acc/concept_AND``,
``probe/shots_04/acc/mean``, ``probe/shots_04/r2``, ``probe/r2``, ``probe/shots_04/patch/...``; files under
``<run_dir>/probe/``: ``cd_per_layer.csv`` (shots, layer, cd), ``concepts.csv`` (shots, concept,
best_layer, cd_at_best_layer, accuracy, n), ``summary.csv`` (one row per shot count: prompts, best_layer,
cd_best, chance, accuracy_mean, r2, slope, intercept, seconds; then a row ``all`` with the fit pooled over
the finished shot counts), ``answers.csv`` (every prompt in prompt order: shots, prompt, concept, gold,
answer as generated and cut at the line break, correct), ``patching.csv``; and ``<run_dir>/plots/probe_*.png``.

Patching keys (``probe/shots_04/patch/``): ``layer``; ``base/concept_AND`` (exact match) and
``positive|negative/concept_AND|mean`` (its change); the same under ``first_token/`` (first-token
accuracy); and per position and layer, ``query/layer_05/exact|first_token/base|positive|negative/concept_AND|mean``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lcd.analysis.stats import linear_fit
from lcd.data.text import prompt_lengths
from lcd.decodability import Distance, chance_level, check_knn_settings, concept_decodability, per_concept_decodability
from lcd.layers import LayerGroup, select_layers
from lcd.lit.generation import (
    answer_budget,
    answer_end_token_ids,
    capture_and_generate,
    decode_answers,
    exact_match,
    first_token_match,
)
from lcd.lit.probe_report import (
    Progress,
    batched_tokens,
    cd_accuracy_points,
    duration,
    format_shot_summary,
    patch_metrics,
    shot_list,
    shot_metrics,
    write_probe_csvs,
)
from lcd.models.hf import CausalLMSpec, LoadedLM
from lcd.patching import PATCH_POSITIONS, PatchMode, PatchPosition, llm_patching
from lcd.plotting import plot_cd_per_layer, plot_cd_vs_accuracy, plot_patching, plot_patching_layers, save_figure
from lcd.rundir import run_dir


class LitProbe(L.LightningModule):
    """Concept Decodability and ICL accuracy of a pretrained LM, per layer and shot count.

    Use with :class:`lcd.data.ICLTextDataModule` under ``lcd validate``. The model is loaded in
    ``setup``; with ``lm.device_map`` set (sharding a large model over GPUs) it is kept outside the
    module's registered children, so Lightning never moves it and accelerate's placement stands.
    Probing runs in one process (use ``device_map`` rather than DDP for models that do not fit).

    Args:
        lm: Which model to load (preset, hub name, directory or GGUF; dtype; device_map).
        layers: Layers to probe, in the one vocabulary of :mod:`lcd.layers`: ``null`` for all, 0-based
            indices (negative count from the end), or a strategy such as ``lcd.layers.LateLayers``.
        k: Neighbours of the leave-one-out k-NN (the paper's 10); must be below the datamodule's
            ``n_per_concept`` (checked before the model loads).
        distance: ``euclidean`` or ``cosine``.
        generate: Generate answers and score accuracy (``False``: CD only).
        patch_shots: Run mean-activation patching at this shot count (must be in ``eval_shots``);
            ``None`` skips patching.
        patch_layer: Layer to patch; ``None`` for the best CD layer at ``patch_shots`` (the paper's
            choice: the probed layer of highest CD on the evaluation prompts at that shot count). A list
            sweeps those layers, each reported under ``patch/<position>/layer_LL/...``, and always adds
            the best CD layer, which the short ``patch/...`` keys report.
        patch_mode: ``replace`` (default) or ``add``; see :mod:`lcd.patching`.
        patch_mean_per_concept: Train-split prompts per class used for the mean activations.
        progress_every_s: Seconds between progress lines when stdout is not a terminal (or the progress
            bar is off); ``null`` for none.
        patch_position: Where to patch (:data:`lcd.patching.PatchPosition`): ``query`` (default, the
            paper's: the last prompt token, which predicts the first answer token) or ``answer`` (the
            query and every generated answer token); a list runs each, and the first is the one the
            short ``patch/...`` keys report.

    """

    def __init__(
        self,
        lm: CausalLMSpec | None = None,
        layers: LayerGroup | list[int] | None = None,
        k: int = 10,
        distance: Distance = "euclidean",
        generate: bool = True,
        patch_shots: int | None = None,
        patch_layer: int | list[int] | None = None,
        patch_mode: PatchMode = "replace",
        patch_mean_per_concept: int = 50,
        progress_every_s: float | None = 30.0,
        patch_position: PatchPosition | list[PatchPosition] = "query",
    ) -> None:
        super().__init__()
        self.lm_spec = lm or CausalLMSpec()
        self.lm_spec.check()  # an unknown model or a missing file fails here, before any work
        if patch_mean_per_concept < 1:
            raise ValueError(f"patch_mean_per_concept must be >= 1, got {patch_mean_per_concept}.")
        if progress_every_s is not None and progress_every_s < 0:
            raise ValueError(f"progress_every_s must be >= 0 (or null for no progress lines), got {progress_every_s}.")
        positions = [patch_position] if isinstance(patch_position, str) else list(patch_position)
        if not positions or any(p not in PATCH_POSITIONS for p in positions):
            raise ValueError(f"patch_position must be among {list(PATCH_POSITIONS)}, got {patch_position}.")
        check_knn_settings(k, distance, k_name="model k", distance_name="model distance")
        self.save_hyperparameters(ignore=["lm"])
        self.hparams["lm"] = vars(self.lm_spec)
        self.layers, self.k, self.distance, self.generate = layers, k, distance, generate
        self.patch_shots, self.patch_layer, self.patch_mode = patch_shots, patch_layer, patch_mode
        self.patch_mean_per_concept, self.patch_positions = patch_mean_per_concept, list(dict.fromkeys(positions))
        self.progress_every_s = progress_every_s
        self.loaded: LoadedLM | None = None
        self._layers: list[int] = []
        self._stop_ids: torch.Tensor | None = None
        self._store: dict[int, dict[str, list]] = {}
        self._progress: Progress | None = None
        self.results: dict[int, dict] = {}

    @property
    def lm(self) -> torch.nn.Module:
        """The loaded Hugging Face model."""
        if self.loaded is None:
            raise RuntimeError("the model is loaded in setup(); run through a Trainer or call load() first.")
        return self.loaded.model

    def load(self) -> LoadedLM:
        """Load the model once; registered as a child unless ``device_map`` placed it already."""
        if self.loaded is None:
            self.loaded = self.lm_spec.load()
            if self.lm_spec.device_map is None:
                self.model = self.loaded.model  # a child: Lightning moves it to the trainer's device
        return self.loaded

    def setup(self, stage: str) -> None:
        """Load the model, give the datamodule its tokenizer, and check every option against both."""
        if self.trainer.world_size > 1:
            raise ValueError("LitProbe runs in one process: set trainer.devices=1 (shard a big model: lm.device_map).")
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "set_tokenizer"):
            raise TypeError("LitProbe needs an lcd.data.ICLTextDataModule (data: class_path ...).")
        check_knn_settings(  # before loading the model: every class (Null too) has n_per_concept prompts
            self.k,
            self.distance,
            dm.n_per_concept,
            k_name="model k",
            distance_name="model distance",
            class_name="each class of the evaluation set (data n_per_concept, Null included)",
            grow="set data n_per_concept to at least {n}",
        )
        if self.patch_shots is not None:  # also before loading the model
            if self.patch_shots not in dm.eval_shots:
                raise ValueError(f"patch_shots={self.patch_shots} is not among data eval_shots={dm.eval_shots}.")
            if not self.generate:
                raise ValueError("patching measures accuracy: set generate: true.")
            if not dm.include_null:
                raise ValueError("negative patching needs the Null class: set data include_null: true.")
        loaded = self.load()
        self._layers = select_layers(self.layers, loaded.n_layers)
        dm.set_tokenizer(loaded.tokenizer)
        if self.patch_layer is not None:
            select_layers(self.patch_layer, loaded.n_layers)  # range check, before any work
        if self.generate and self._stop_ids is None:
            self._stop_ids = answer_end_token_ids(loaded.tokenizer)

    # --- the pass over the prompts --------------------------------------------------------------------

    def on_validation_start(self) -> None:
        """Plan the work for progress lines; our per-shot-count tables replace Lightning's metric table."""
        if self.trainer.validating:
            self.trainer.validate_loop.verbose = False  # one table per dataloader, every metric in each
        bar = self.trainer.progress_bar_callback
        every = self.progress_every_s
        if every is not None and (bar is None or not sys.stdout.isatty()):
            self._progress = Progress(self._plan(), every)
        else:
            self._progress = None

    def on_validation_epoch_start(self) -> None:
        """Start empty stores and results, one per shot count."""
        self._store, self.results = {}, {}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Capture every probed layer at the last prompt token; greedily answer; keep both."""
        t0, tok = time.time(), self.loaded.tokenizer
        shots = batch["n_shots"]
        budget = answer_budget(tok, batch["answers"]) if self.generate else 0
        stop = self._stop_ids if self.generate else None
        feats, gen = capture_and_generate(
            self.lm, batch["input_ids"], batch["attention_mask"], self._layers, budget, tok.pad_token_id, stop
        )
        store = self._store.setdefault(
            shots,
            {"features": [], "concept": [], "index": [], "answers": [], "predictions": [], "first_hits": [], "t0": t0},
        )
        store["features"].append(feats.cpu())  # (L, B, d)
        store["concept"].append(batch["concept"].cpu())
        n, seen = batch["input_ids"].shape[0], sum(len(i) for i in store["index"])
        store["index"].append(batch["index"].cpu() if "index" in batch else torch.arange(seen, seen + n))
        store["answers"] += batch["answers"]
        if self.generate:
            store["predictions"] += decode_answers(tok, gen)
            store["first_hits"].append(first_token_match(gen, batch["first_answer_id"].to(gen.device)).cpu())
        self._report_progress(shots, batch)
        if not self.trainer.sanity_checking and batch_idx + 1 == self.trainer.num_val_batches[dataloader_idx]:
            self._finish(shots)  # the last batch of this shot count: write what it found now

    def _report_progress(self, shots: int, batch: dict, passes: int = 1) -> None:
        """Count a batch (``passes`` forward passes over it) in the progress lines; ``shots`` -1: patching."""
        if self._progress is not None:
            mask = batch["attention_mask"]
            line = self._progress.update(shots, len(mask), passes * int(mask.sum()), passes * mask.numel())
            if line:
                rank_zero_info(line)

    def _patch_progress(self, batch: dict, passes: int) -> None:
        self._report_progress(-1, batch, passes)

    def _finish(self, shots: int) -> None:
        """CD, accuracy and R² of one finished shot count; (re)write the files; print its table."""
        store = self._store[shots]
        index = torch.cat(store["index"])
        order = index.argsort()  # back to prompt order (batches came longest first)
        features = torch.cat(store["features"], 1)[:, order]  # (L, N, d)
        labels = torch.cat(store["concept"])[order]  # (N,)
        gold = [store["answers"][i] for i in order.tolist()]
        names = self.trainer.datamodule.concept_names  # concepts then Null
        null_id = len(names) - 1
        cd = concept_decodability(features, labels, self.k, self.distance)  # (L,)
        best = int(cd.argmax())
        per_cd = per_concept_decodability(features[best], labels, self.k, self.distance)
        res = {"layers": self._layers, "cd": cd, "best_layer": self._layers[best], "concepts": {}}
        res.update(n_prompts=len(gold), chance=chance_level(labels), seconds=time.time() - store["t0"])
        correct = first_hits = None
        if self.generate:
            predictions = [store["predictions"][i] for i in order.tolist()]
            correct, first_hits = exact_match(predictions, gold), torch.cat(store["first_hits"])[order]
            rows = zip(index[order].tolist(), labels.tolist(), gold, predictions, correct.tolist(), strict=True)
            res["answers"] = list(rows)  # (prompt, concept id, gold, answer, correct) in prompt order
        for c in sorted(per_cd):  # the classes present (Null only if the data includes it)
            scored = correct is not None and c != null_id
            acc = correct[labels == c].float().mean().item() if scored else None
            res["concepts"][names[c]] = {"cd": per_cd[c], "acc": acc, "n": int((labels == c).sum())}
            if scored:  # the unpatched first-token accuracy that patching compares with
                res["concepts"][names[c]]["acc_first_token"] = first_hits[labels == c].float().mean().item()
        if correct is not None:
            accs = [r["acc"] for r in res["concepts"].values() if r["acc"] is not None]
            res["acc_mean"] = sum(accs) / len(accs)
            res["fit"] = linear_fit(*cd_accuracy_points({shots: res}))
        self.results[shots] = res
        self.write_outputs()
        if self.trainer.is_global_zero:
            rank_zero_info(format_shot_summary(shots, res))

    def on_validation_epoch_end(self) -> None:
        """Finish any shot count left (a limited run), pool R², patch if asked; log every metric."""
        if self.trainer.sanity_checking or not self._store:
            return
        for shots in sorted(self._store):
            if shots not in self.results:
                self._finish(shots)
        names = self.trainer.datamodule.concept_names
        null_id = len(names) - 1
        metrics = shot_metrics(self.results)
        if self.generate:
            fit = linear_fit(*cd_accuracy_points(self.results))
            metrics["probe/r2"] = fit[2]
            rank_zero_info(f"probe | R² of accuracy on CD, pooled over {shot_list(self.results)} shots: {fit[2]:.3f}")
        if self.patch_shots is not None:
            t0 = time.time()
            rank_zero_info(f"probe | patching at {self.patch_shots} shots ...")
            metrics.update(self._patch(names, null_id))
            p = f"probe/shots_{self.patch_shots:02d}/patch"
            pos, neg = metrics[f"{p}/positive/mean"], metrics[f"{p}/negative/mean"]
            rank_zero_info(
                f"probe | patching at {self.patch_shots} shots, layer {int(metrics[f'{p}/layer'])}: mean accuracy "
                f"change positive {pos:+.3f}, negative {neg:+.3f} ({duration(time.time() - t0)})"
            )
        self.log_dict(metrics, sync_dist=False)
        self.write_outputs()
        if self.trainer.is_global_zero:
            rank_zero_info(f"probe | files in {Path(run_dir(self.trainer)) / 'probe'}")

    def _plan(self) -> dict[int, tuple[int, int]]:
        """Prompts and tokens computed (padding included) per shot count, and for patching (key -1)."""
        dm, tok = self.trainer.datamodule, self.loaded.tokenizer
        plan = {}
        for i, shots in enumerate(dm.eval_shots):
            n_batches = self.trainer.num_val_batches[i] if i < len(self.trainer.num_val_batches) else 0
            plan[shots] = batched_tokens(prompt_lengths(tok, dm.eval_prompts(shots)), dm.eval_batch_size, n_batches)
        if self.patch_shots is not None:  # the means once, the non-Null prompts twice per run (unpatched: the probe's)
            null_id = len(dm.concept_names) - 1
            evals = [p for p in dm.eval_prompts(self.patch_shots) if p.concept != null_id]
            means = dm.prompts(self.patch_shots, "train", self.patch_mean_per_concept, include_null=True, stream=3)
            n_e, t_e = batched_tokens(prompt_lengths(tok, evals), dm.eval_batch_size)
            n_m, t_m = batched_tokens(prompt_lengths(tok, means), dm.eval_batch_size)
            layers = len(self.patch_layer) + 1 if isinstance(self.patch_layer, list) else 1  # + the best layer
            passes = 2 * layers * len(self.patch_positions)
            plan[-1] = (n_e + n_m, passes * t_e + t_m)  # prompts patched or averaged; tokens of every pass
        return plan

    def _patch(self, names: list[str], null_id: int) -> dict[str, float]:
        """Patch at ``patch_shots``; keys ``patch/...`` (primary layer and position) and per layer and position.

        Keys under ``probe/shots_XX/patch/``: ``layer``; ``base/concept_X|mean`` (exact match),
        ``positive|negative/concept_X|mean`` (exact-match change); the same under ``first_token/``
        (first-token accuracy); and for every position P and layer LL, ``P/layer_LL/exact|first_token/
        base|positive|negative/concept_X|mean`` (base: accuracy; positive, negative: change).
        """
        dm, shots = self.trainer.datamodule, self.patch_shots
        best, n_layers = self.results[shots]["best_layer"], self.loaded.n_layers
        if isinstance(self.patch_layer, list):  # a sweep, always with the best CD layer (the short keys')
            primary, layers = best, select_layers([*self.patch_layer, best], n_layers)
        else:
            (primary,) = layers = select_layers(best if self.patch_layer is None else self.patch_layer, n_layers)
        means = dm.loader(dm.prompts(shots, "train", self.patch_mean_per_concept, include_null=True, stream=3))
        evals = dm.loader(dm.eval_prompts(shots))
        tok, concepts = self.loaded.tokenizer, self.results[shots]["concepts"]
        # the probe's own answers to these prompts are the unpatched ones: no pass to repeat
        keys = {"exact": "acc", "first_token": "acc_first_token"}
        base = {m: torch.tensor([concepts[names[c]][key] for c in range(null_id)]) for m, key in keys.items()}
        out = llm_patching(
            self.lm, tok, means, evals, layers, null_id, self.patch_mode, self.patch_positions, base=base,
            on_batch=self._patch_progress, stop_token_ids=self._stop_ids,
        )  # fmt: skip
        main = next(r for r in out if r.position == self.patch_positions[0] and r.layer == primary)
        self.results[shots]["patching"], self.results[shots]["patching_primary"] = out, main
        p = f"probe/shots_{shots:02d}/patch"
        metrics = {f"{p}/layer": float(main.layer)}
        for metric, key in (("exact", p), ("first_token", f"{p}/first_token")):
            metrics.update(patch_metrics(main, metric, key, names, null_id))
        for r in out:
            for metric in ("exact", "first_token"):
                key = f"{p}/{r.position}/layer_{r.layer:02d}/{metric}"
                metrics.update(patch_metrics(r, metric, key, names, null_id))
        return metrics

    # --- files --------------------------------------------------------------------------------------

    def write_outputs(self) -> None:
        """CSV files under ``<run_dir>/probe`` (each written whole) and PNG plots under ``<run_dir>/plots`` (rank 0)."""
        if not self.trainer.is_global_zero or not self.results:
            return
        names = self.trainer.datamodule.concept_names
        write_probe_csvs(Path(run_dir(self.trainer)) / "probe", self.results, names, self.generate, self.patch_mode)
        save_figure(self.trainer, plot_cd_per_layer(self.results, chance=1 / len(names)), "probe_cd_per_layer")
        if self.generate:
            save_figure(self.trainer, plot_cd_vs_accuracy(self.results), "probe_cd_vs_accuracy")
        for shots, res in self.results.items():
            if "patching" in res:
                plot = plot_patching(res["patching_primary"], names[:-1], shots)
                save_figure(self.trainer, plot, "probe_patching")
                if len(res["patching"]) > 1:
                    save_figure(self.trainer, plot_patching_layers(res["patching"], shots), "probe_patching_layers")
