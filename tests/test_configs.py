"""Every YAML under configs/ and callbacks/ is parsed and instantiated through the real CLI parser.

Each composition below is what a user runs (a trainer, a task+model preset, fragments); ``make_cli(run=False)``
parses it and builds the trainer, model and datamodule, and the test checks what the fragments were meant to
set. The first test fails when a YAML file is not part of any composition, so a new fragment needs one here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
from conftest import ROOT
from tiny_lm import save_tiny_lm

from lcd.callbacks import ConceptDecodability
from lcd.cli import make_cli
from lcd.loggers import CSVLogger, WandbLogger
from lcd.models.hf import PRESETS

CPU = ["configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml"]
ON_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]
LLM_DEBUG = ["configs/debug.yaml", "configs/llm/debug.yaml"]
FINETUNE = ["configs/trainer/cpu.yaml", "configs/finetune/base.yaml", "configs/llm/models/gemma3_270m.yaml"]
BITWISE = "configs/llm/tasks/bitwise.yaml"
CD = "callbacks/concept_decodability.yaml"
# the blocks each strategy fragment selects in a 32-layer model
LAYER_GROUPS = {
    "early": list(range(11)),  # fraction 0.333 of 32 -> 11
    "late": list(range(21, 32)),
    "all": list(range(32)),
    "early10": list(range(10)),  # the paper's first 10 of Llama-3.1-8B's 32
    "late10": list(range(22, 32)),
}

# (name, subcommand, YAML files in order, extra arguments)
COMPOSITIONS = [
    ("make run", "fit", [*CPU, CD], []),
    ("make run, debug, kept checkpoints", "fit",
     [*CPU, CD, "callbacks/keep_checkpoints.yaml", "configs/debug.yaml"], []),
    ("paper tokenisation", "fit", [*CPU, "configs/synthetic/y_first.yaml", CD], []),
    ("paper preset on GPUs", "fit", ["configs/trainer/gpu.yaml", "configs/synthetic/paper.yaml", CD], ON_CPU),
    *(
        (f"probe {model.stem} {task.stem}", "validate",
         ["configs/llm/probe.yaml", str(model.relative_to(ROOT)), str(task.relative_to(ROOT))], [])
        for model in sorted((ROOT / "configs/llm/models").glob("*.yaml"))
        for task in sorted((ROOT / "configs/llm/tasks").glob("*.yaml"))
        if model.stem in ("gemma3_270m", "smollm2_135m") or task.stem == "bitwise"
    ),
    ("probe with patching, debug", "validate",
     ["configs/llm/probe.yaml", BITWISE, "configs/llm/patching.yaml", *LLM_DEBUG], []),
    *(
        (f"finetune {strategy}", "fit", [*FINETUNE, BITWISE, f"configs/finetune/{strategy}.yaml", CD], [])
        for strategy in ("early", "late", "all", "early10", "late10")
    ),
    ("finetune plain, concept named, debug", "fit",
     [*FINETUNE, BITWISE, "configs/finetune/late.yaml", "configs/finetune/plain.yaml",
      "configs/finetune/name_concept.yaml", CD, *LLM_DEBUG], []),
    ("finetune on GPUs", "fit",
     ["configs/trainer/gpu.yaml", *FINETUNE[1:], BITWISE, "configs/finetune/early10.yaml", CD], ON_CPU),
]  # fmt: skip


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache holding a tiny model under every hub preset's name, as `hf download` would leave it."""
    cache = tmp_path_factory.mktemp("hub")
    model = save_tiny_lm(tmp_path_factory.mktemp("tiny") / "llama", "llama")
    commit = "0" * 40
    for name in {n for n in PRESETS.values() if not n.startswith("gguf:")}:
        repo = cache / f"models--{name.replace('/', '--')}"
        shutil.copytree(model, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    return cache


def test_every_yaml_belongs_to_a_composition():
    used = {Path(f) for _, _, files, _ in COMPOSITIONS for f in files}
    yamls = {p.relative_to(ROOT) for p in [*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "callbacks").glob("*.yaml")]}
    assert yamls, "no YAML found"
    assert not yamls - used, f"YAMLs no composition instantiates: {sorted(map(str, yamls - used))}"
    assert not used - yamls, f"compositions name missing files: {sorted(map(str, used - yamls))}"


@pytest.fixture(scope="module")
def tiny_32_layers(tmp_path_factory):
    """LitFinetune loads its model when built: a tiny 32-layer Gemma 3 (Llama-3.1-8B's depth) stands in."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny") / "gemma3_32", "gemma3", n_layers=32)


@pytest.mark.parametrize(("name", "subcommand", "files", "extra"), COMPOSITIONS, ids=[c[0] for c in COMPOSITIONS])
def test_composition_instantiates(name, subcommand, files, extra, tmp_path, monkeypatch, hub_cache, tiny_32_layers):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    if "configs/finetune/base.yaml" in files:
        extra = [*extra, f"--model.init_args.lm.name={tiny_32_layers}"]
    # run=False: LightningCLI parses and instantiates without a subcommand (the subcommand only picks the loop)
    args = [*(a for f in files for a in ("--config", str(ROOT / f))), *extra]
    cli = make_cli([*args, f"--trainer.default_root_dir={tmp_path / 'run'}"], run=False)
    loggers = {type(logger) for logger in cli.trainer.loggers}
    cds = [cb for cb in cli.trainer.callbacks if isinstance(cb, ConceptDecodability)]
    assert len(cds) == (1 if CD in files else 0)
    if "configs/debug.yaml" in files:
        assert loggers == {CSVLogger} and cli.trainer.max_steps == 4
    else:  # the CLI's default loggers: no fragment lists them
        assert loggers == {WandbLogger, CSVLogger}
    if "configs/synthetic/cpu.yaml" in files:  # sizes written once, on the task, and linked to the network
        task, net = cli.datamodule.task, cli.model.net
        assert (net.n_dims, net.n_pairs) == (task.n_dims, task.n_pairs) == (4, 8)
        y_first = "configs/synthetic/y_first.yaml" in files
        assert cli.model.probe_position == ("query" if y_first else "last_y")
    if "configs/synthetic/paper.yaml" in files:
        assert (cli.model.net.n_dims, cli.model.net.n_pairs) == (16, 20)
    if "callbacks/keep_checkpoints.yaml" in files:
        assert sum(type(cb).__name__ == "ModelCheckpoint" for cb in cli.trainer.callbacks) == 2
    if "configs/finetune/base.yaml" in files:
        assert cli.trainer.gradient_clip_val is None  # finetuning does not clip, whatever the trainer fragment
        assert cli.trainer.max_steps == (4 if "configs/debug.yaml" in files else 1250)
        strategy = next(f for f in files if Path(f).stem in LAYER_GROUPS)
        assert cli.model.method.resolved_layers == LAYER_GROUPS[Path(strategy).stem]
        assert type(cli.model.method).__name__ == (
            "LayerFinetune" if "configs/finetune/plain.yaml" in files else "LoRA"
        )
        assert cli.datamodule.name_concept == ("configs/finetune/name_concept.yaml" in files)
    if "configs/llm/debug.yaml" in files:
        assert cli.datamodule.n_per_concept == 11 and cli.datamodule.eval_shots == [1, 4]
        assert cli.trainer.limit_val_batches == 1.0  # every prompt, although configs/debug.yaml limits batches


def test_configs_are_found_outside_a_checkout(tmp_path, monkeypatch):
    # From a directory without configs/, the relative paths of the README resolve to the copies shipped inside
    # the package (src/lcd/presets), which must be the same files as the checkout's.
    from lcd.configs import find_config, shipped_root

    monkeypatch.chdir(tmp_path)
    for rel in ["configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml", CD]:
        assert find_config(rel).read_bytes() == (ROOT / rel).read_bytes()
        assert find_config(rel).is_relative_to(shipped_root())
    cli = make_cli(["--config", CPU[0], "--config", CPU[1], "--config", CD, "--config", "configs/debug.yaml",
                    f"--trainer.default_root_dir={tmp_path / 'run'}"], run=False)  # fmt: skip
    assert cli.model.probe_position == "last_y"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "debug.yaml").write_text("trainer:\n  max_steps: 7\n")  # the working directory wins
    assert find_config("configs/debug.yaml") == Path("configs/debug.yaml")
