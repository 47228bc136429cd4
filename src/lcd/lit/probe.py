r"""Probing a pretrained causal LM on natural ICL tasks: CD per layer vs shots, accuracy, R², patching.

Run it as a validation::

    lcd validate --config configs/llm/probe.yaml --config configs/llm/models/gemma3_270m.yaml \\
        --config configs/llm/tasks/bitwise.yaml [--config configs/llm/patching.yaml]

For every shot count of the datamodule (``eval_shots``, one validation dataloader each), one batched
forward pass per batch captures the residual stream of every layer at the token before the answer and
fills the KV cache from which the greedy answer is generated (:func:`lcd.lit.generation.capture_and_generate`).
At the end: CD per layer (leave-one-out 10-NN over the concepts and Null), the best layer, per-concept
CD there, exact-match accuracy per concept, and the linear fit of accuracy on per-concept CD (R² per
shot count and pooled over shot counts). Optionally, mean-activation patching at one shot count
(:func:`lcd.patching.llm_patching`).

Outputs: W&B/CSV logger keys ``probe/shots_04/cd/layer_05``, ``probe/shots_04/cd/best``,
``probe/shots_04/cd/best_layer``, ``probe/shots_04/cd/concept_AND``, ``probe/shots_04/acc/concept_AND``,
``probe/shots_04/acc/mean``, ``probe/shots_04/r2``, ``probe/r2``, ``probe/shots_04/patch/...``; files
``<run_dir>/probe/{cd_per_layer,concepts,patching}.csv`` and ``<run_dir>/plots/probe_*.png``.

Patching keys (``probe/shots_04/patch/``): ``layer``; ``base/concept_AND`` (exact match) and
``positive|negative/concept_AND|mean`` (its change); the same under ``first_token/`` (first-token
accuracy); and per position and layer, ``query/layer_05/exact|first_token/base|positive|negative/concept_AND|mean``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch

from lcd.analysis.stats import linear_fit
from lcd.decodability import Distance, chance_level, check_knn_settings, concept_decodability, per_concept_decodability
from lcd.layers import LayerGroup, select_layers
from lcd.lit.generation import answer_budget, capture_and_generate, decode_answers, exact_match
from lcd.models.hf import CausalLMSpec, LoadedLM
from lcd.patching import PATCH_POSITIONS, PatchMode, PatchPosition, llm_patching
from lcd.plotting import plot_cd_per_layer, plot_cd_vs_accuracy, plot_patching, plot_patching_layers, save_figure
from lcd.runs import run_dir


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
        patch_position: PatchPosition | list[PatchPosition] = "query",
    ) -> None:
        super().__init__()
        self.lm_spec = lm or CausalLMSpec()
        self.lm_spec.check()  # an unknown model or a missing file fails here, before any work
        if patch_mean_per_concept < 1:
            raise ValueError(f"patch_mean_per_concept must be >= 1, got {patch_mean_per_concept}.")
        positions = [patch_position] if isinstance(patch_position, str) else list(patch_position)
        if not positions or any(p not in PATCH_POSITIONS for p in positions):
            raise ValueError(f"patch_position must be among {list(PATCH_POSITIONS)}, got {patch_position}.")
        check_knn_settings(k, distance, k_name="model k", distance_name="model distance")
        self.save_hyperparameters(ignore=["lm"])
        self.hparams["lm"] = vars(self.lm_spec)
        self.layers, self.k, self.distance, self.generate = layers, k, distance, generate
        self.patch_shots, self.patch_layer, self.patch_mode = patch_shots, patch_layer, patch_mode
        self.patch_mean_per_concept, self.patch_positions = patch_mean_per_concept, list(dict.fromkeys(positions))
        self.loaded: LoadedLM | None = None
        self._layers: list[int] = []
        self._store: dict[int, dict[str, list[torch.Tensor]]] = {}
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
        loaded = self.load()
        self._layers = select_layers(self.layers, loaded.n_layers)
        dm.set_tokenizer(loaded.tokenizer)
        if self.patch_shots is not None:
            if self.patch_shots not in dm.eval_shots:
                raise ValueError(f"patch_shots={self.patch_shots} is not among data eval_shots={dm.eval_shots}.")
            if not self.generate:
                raise ValueError("patching measures accuracy: set generate: true.")
            if not dm.include_null:
                raise ValueError("negative patching needs the Null class: set data include_null: true.")
        if self.patch_layer is not None:
            select_layers(self.patch_layer, loaded.n_layers)  # range check, before any work

    # --- the pass over the prompts --------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        """Start empty stores, one per shot count."""
        self._store = {}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Capture every probed layer at the last prompt token; greedily answer; keep both."""
        tok = self.loaded.tokenizer
        budget = answer_budget(tok, batch["answers"]) if self.generate else 0
        feats, gen = capture_and_generate(
            self.lm, batch["input_ids"], batch["attention_mask"], self._layers, budget, tok.pad_token_id
        )
        store = self._store.setdefault(batch["n_shots"], {"features": [], "concept": [], "correct": []})
        store["features"].append(feats.cpu())  # (L, B, d)
        store["concept"].append(batch["concept"].cpu())
        if self.generate:
            store["correct"].append(exact_match(decode_answers(tok, gen), batch["answers"]))

    def on_validation_epoch_end(self) -> None:
        """CD per layer, best layer, accuracy, R²; log, write CSV and PNG; then patching if asked."""
        if self.trainer.sanity_checking or not self._store:
            return
        names = self.trainer.datamodule.concept_names  # concepts then Null
        null_id, metrics = len(names) - 1, {}
        for shots, store in sorted(self._store.items()):
            features, labels = torch.cat(store["features"], 1), torch.cat(store["concept"])  # (L, N, d), (N,)
            cd = concept_decodability(features, labels, self.k, self.distance)  # (L,)
            best = int(cd.argmax())
            per_cd = per_concept_decodability(features[best], labels, self.k, self.distance)
            res = {"layers": self._layers, "cd": cd, "best_layer": self._layers[best], "concepts": {}}
            correct = torch.cat(store["correct"]) if store["correct"] else None
            for c in sorted(per_cd):  # the classes present (Null only if the data includes it)
                acc = correct[labels == c].float().mean().item() if correct is not None and c != null_id else None
                res["concepts"][names[c]] = {"cd": per_cd[c], "acc": acc, "n": int((labels == c).sum())}
            self.results[shots] = res
            p = f"probe/shots_{shots:02d}"
            metrics.update({f"{p}/cd/layer_{layer:02d}": cd[i].item() for i, layer in enumerate(self._layers)})
            metrics.update({f"{p}/cd/best": cd[best].item(), f"{p}/cd/best_layer": float(self._layers[best])})
            for name, r in res["concepts"].items():
                metrics[f"{p}/cd/concept_{name}"] = r["cd"]
                if r["acc"] is not None:
                    metrics[f"{p}/acc/concept_{name}"] = r["acc"]
            if correct is not None:
                accs = [r["acc"] for r in res["concepts"].values() if r["acc"] is not None]
                metrics[f"{p}/acc/mean"] = sum(accs) / len(accs)
                res["fit"] = linear_fit(*self._scatter({shots: res}))
                metrics[f"{p}/r2"] = res["fit"][2]
        metrics["probe/chance"] = chance_level(labels)
        if self.generate:
            metrics["probe/r2"] = linear_fit(*self._scatter(self.results))[2]
        if self.patch_shots is not None:
            metrics.update(self._patch(names, null_id))
        self.log_dict(metrics, sync_dist=False)
        self.write_outputs()

    @staticmethod
    def _scatter(results: dict[int, dict]) -> tuple[list[float], list[float]]:
        pts = [
            (r["cd"], r["acc"]) for res in results.values() for r in res["concepts"].values() if r["acc"] is not None
        ]
        return [x for x, _ in pts], [y for _, y in pts]

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
        tok = self.loaded.tokenizer
        out = llm_patching(self.lm, tok, means, evals, layers, null_id, self.patch_mode, self.patch_positions)
        main = next(r for r in out if r.position == self.patch_positions[0] and r.layer == primary)
        self.results[shots]["patching"], self.results[shots]["patching_primary"] = out, main
        p = f"probe/shots_{shots:02d}/patch"
        metrics = {f"{p}/layer": float(main.layer)}
        for metric, key in (("exact", p), ("first_token", f"{p}/first_token")):
            metrics.update(self._patch_metrics(main, metric, key, names, null_id))
        for r in out:
            for metric in ("exact", "first_token"):
                key = f"{p}/{r.position}/layer_{r.layer:02d}/{metric}"
                metrics.update(self._patch_metrics(r, metric, key, names, null_id))
        return metrics

    @staticmethod
    def _patch_metrics(r, metric: str, key: str, names: list[str], null_id: int) -> dict[str, float]:
        """``key/base/...`` accuracy, ``key/positive|negative/...`` change, per concept and mean."""
        base = r.accuracy(metric, "base")
        m = {f"{key}/base/concept_{names[c]}": base[c].item() for c in range(null_id)}
        m[f"{key}/base/mean"] = base.mean().item()
        for sign in ("positive", "negative"):
            delta = r.accuracy(metric, sign) - base
            m.update({f"{key}/{sign}/concept_{names[c]}": delta[c].item() for c in range(null_id)})
            m[f"{key}/{sign}/mean"] = delta.mean().item()
        return m

    # --- files --------------------------------------------------------------------------------------

    def write_outputs(self) -> None:
        """CSV files under ``<run_dir>/probe`` and PNG plots under ``<run_dir>/plots`` (rank 0)."""
        if not self.trainer.is_global_zero:
            return
        out = Path(run_dir(self.trainer)) / "probe"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "cd_per_layer.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["shots", "layer", "cd"])
            for shots, res in sorted(self.results.items()):
                w.writerows(
                    [shots, layer, f"{v:.4f}"] for layer, v in zip(res["layers"], res["cd"].tolist(), strict=True)
                )
        with open(out / "concepts.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["shots", "concept", "best_layer", "cd_at_best_layer", "accuracy", "n"])
            for shots, res in sorted(self.results.items()):
                for name, r in res["concepts"].items():
                    acc = "" if r["acc"] is None else f"{r['acc']:.4f}"
                    w.writerow([shots, name, res["best_layer"], f"{r['cd']:.4f}", acc, r["n"]])
        names = self.trainer.datamodule.concept_names
        save_figure(self.trainer, plot_cd_per_layer(self.results, chance=1 / len(names)), "probe_cd_per_layer")
        if self.generate:
            save_figure(self.trainer, plot_cd_vs_accuracy(self.results), "probe_cd_vs_accuracy")
        for shots, res in self.results.items():
            if "patching" in res:
                self._write_patching(out / "patching.csv", shots, res["patching"], names[:-1])
                plot = plot_patching(res["patching_primary"], names[:-1], shots)
                save_figure(self.trainer, plot, "probe_patching")
                if len(res["patching"]) > 1:
                    save_figure(self.trainer, plot_patching_layers(res["patching"], shots), "probe_patching_layers")

    def _write_patching(self, path: Path, shots: int, results: list, concepts: list[str]) -> None:
        """One row per position, layer and concept: exact match and first-token accuracy, base and patched."""
        cols = ["base", "positive", "negative"]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["shots", "layer", "mode", "position", "concept", "n", *cols, *(f"{c}_first_token" for c in cols)]
            )
            for r in results:
                for c, name in enumerate(concepts):
                    accs = [r.accuracy(m, sign)[c] for m in ("exact", "first_token") for sign in cols]
                    row = [shots, r.layer, self.patch_mode, r.position, name, int(r.n[c])]
                    w.writerow([*row, *(f"{v:.4f}" for v in accs)])
