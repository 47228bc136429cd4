"""LitFinetune through the real CLI with tiny LMs: strategy swap, masking, resume, adapters, every YAML."""

import csv
import json

import pytest
import torch
from conftest import config
from tiny_lm import save_tiny_lm

from lcd.cli import main, make_cli
from lcd.data.text import IGNORE_INDEX, encode_prompts
from lcd.finetuning import LoRA, lora_targets
from lcd.layers import LateLayers
from lcd.lit.finetune import LitFinetune, export_merged
from lcd.models.hf import CausalLMSpec
from lcd.rundir import read_history
from lcd.tasks import BitwiseTask, make_prompts

BASE = config("configs/trainer/cpu.yaml", "configs/finetune/base.yaml", "configs/llm/tasks/bitwise.yaml")
DEBUG = config("configs/debug.yaml", "configs/llm/debug.yaml")
CD = config("callbacks/concept_decodability.yaml")
# the CD callback, shrunk (k must stay below the prompts per concept)
SMALL_CD = ["--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.probe_per_concept=4", "--trainer.callbacks.k=3"]


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "gemma3", "gemma3")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "llama", "llama")


def args(lm, run_dir, *fragments, extra=()):
    return [*BASE, *config(*fragments), *DEBUG, *CD, f"--model.init_args.lm.name={lm}",
            f"--trainer.default_root_dir={run_dir}", *SMALL_CD, *extra]  # fmt: skip


def adapter_layers(run_dir):
    return json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["layers_to_transform"]


@pytest.mark.slow  # two fits
def test_strategy_swap_is_one_config_change(tiny_gemma, tmp_path):
    early, late = tmp_path / "early", tmp_path / "late"
    main(["fit", *args(tiny_gemma, early, "configs/finetune/early.yaml")])
    main(["fit", *args(tiny_gemma, late, "configs/finetune/late.yaml")])
    assert adapter_layers(early) == [0] and adapter_layers(late) == [1]  # a third of 2 layers: one block
    for run, layer in [(early, 0), (late, 1)]:
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["state_dict"] and all(f".layers.{layer}." in k and ".lora_" in k for k in ckpt["state_dict"])
        rows = read_history(run / "cd_history.csv")
        assert [r["step"] for r in rows] == [0, 2, 4] and {"cd/layer_00", "cd/layer_01"} <= rows[0].keys()
        (metrics,) = run.glob("csv/version_*/metrics.csv")
        header = metrics.read_text().splitlines()[0].split(",")
        assert {"train/loss", "val/shots_04/acc/concept_XNOR", "val/shots_01/acc/mean", "cd/best"} <= set(header)


def test_late_lora_cannot_change_cd_upstream(tiny_llama, tmp_path):
    # 4 layers, last one adapted: layers 0-2 see exactly the pretrained residual stream at every step.
    run = tmp_path / "late"
    lr = ["--optimizer.init_args.lr=0.05", "--model.init_args.method.init_args.layers.init_args.fraction=0.25"]
    save_tiny_lm(tmp_path / "lm4", "llama")
    cfg = json.loads((tmp_path / "lm4" / "config.json").read_text())
    cfg["num_hidden_layers"], cfg["layer_types"] = 4, None
    (tmp_path / "lm4" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    main(["fit", *args(tmp_path / "lm4", run, "configs/finetune/late.yaml", extra=lr)])
    assert adapter_layers(run) == [3]
    rows = read_history(run / "cd_history.csv")
    for key in ["cd/layer_00", "cd/layer_01", "cd/layer_02"]:
        assert len({r[key] for r in rows}) == 1, key


def test_plain_and_all_and_named_concept_yaml(tiny_gemma, tmp_path):
    run = tmp_path / "plain"
    main(["fit", *args(tiny_gemma, run, "configs/finetune/all.yaml", "configs/finetune/plain.yaml",
                       "configs/finetune/name_concept.yaml")])  # fmt: skip
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert {k.split(".")[3] for k in ckpt["state_dict"]} == {"0", "1"}  # model.model.layers.<i>....
    assert not any("lora" in k or "embed" in k for k in ckpt["state_dict"])
    assert (run / "adapter" / "trainable.safetensors").exists()


@pytest.mark.slow  # two fits
def test_paper_fragments_and_gpu_fragment(tiny_gemma, tmp_path):
    count1 = ["--model.init_args.method.init_args.layers.init_args.count=1"]
    cpu = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.devices=1", "--trainer.strategy=auto"]
    for fragment, layer in [("configs/finetune/early10.yaml", 0), ("configs/finetune/late10.yaml", 1)]:
        run = tmp_path / str(layer)
        main(["fit", *args(tiny_gemma, run, "configs/trainer/gpu.yaml", fragment, extra=[*count1, *cpu])])
        assert adapter_layers(run) == [layer]
    with pytest.raises(SystemExit, match="count=10 exceeds the model's 2 layers"):
        main(["fit", *args(tiny_gemma, tmp_path / "bad", "configs/finetune/early10.yaml")])
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_out_of_range_layers_fail_before_training(tiny_gemma, tmp_path):
    fragment = tmp_path / "layer5.yaml"
    fragment.write_text(
        "model:\n  init_args:\n    method:\n      init_args:\n"
        "        layers: [5]\n"  # a plain list: the same vocabulary as the CD callback's and the probe's layers
    )
    with pytest.raises(SystemExit, match=r"layer 5 is out of range for a model with 2 layers"):
        main(["fit", *args(tiny_gemma, tmp_path / "run", str(fragment))])
    assert not (tmp_path / "run").exists()


def test_frozen_parameters_unchanged_and_adapter_moves(tiny_gemma, tmp_path):
    cli = make_cli([*args(tiny_gemma, tmp_path / "run", "configs/finetune/late.yaml")], run=False)
    model = cli.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cli.trainer.fit(model, datamodule=cli.datamodule)
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved and moved <= trainable
    assert all(".layers.1." in n and "lora_" in n for n in trainable)


def lit(tiny, method=None, adapter=None):
    return LitFinetune(lm=CausalLMSpec(name=str(tiny)), method=method, adapter=adapter)


def answer_batch(module, n=6):
    prompts = make_prompts(BitwiseTask(), n_shots=2, n_per_concept=1, split="train", include_null=False)[:n]
    return encode_prompts(module.tokenizer, prompts, with_answers=True)


def test_loss_counts_answer_tokens_only(tiny_llama):
    module = lit(tiny_llama).eval()
    batch = answer_batch(module)
    is_answer = batch["labels"] != IGNORE_INDEX
    for row, answer in zip(batch["labels"], batch["answers"], strict=True):  # the answer's tokens, then "\n"
        assert module.tokenizer.decode(row[row != IGNORE_INDEX]).lstrip(" ") == answer + "\n"
    answer_len = is_answer.sum(1)
    nll, count = module.answer_nll(batch)
    assert torch.equal(count, answer_len)
    with torch.no_grad():
        reference = module.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
            labels=batch["labels"],
        ).loss  # transformers' own shifted, masked loss on full logits
    torch.testing.assert_close(nll.sum() / count.sum(), reference)
    # changing a prompt token's label to a real id would add it to the loss; -100 keeps it out
    batch["labels"][:, 0] = 5
    nll2, count2 = module.answer_nll(batch)
    assert torch.equal(count2, answer_len)  # position 0 is never predicted: still only answers counted


def test_probe_returns_query_features_labels_and_loss(tiny_llama):
    module = lit(tiny_llama).eval()
    batch = answer_batch(module)
    with torch.no_grad():
        features, labels, loss = module.probe(batch, [0, 1])
        hidden = module.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
            output_hidden_states=True,
        ).hidden_states
    assert features.shape == (2, 6, 16) and loss.shape == (6,) and torch.equal(labels, batch["concept"])
    rows = torch.arange(6)
    torch.testing.assert_close(features[0], hidden[1][rows, batch["query_position"]])  # block 0 output
    with pytest.raises(ValueError, match="position must be"):
        module.probe(batch, [0], position="middle")


@pytest.mark.slow  # a fit, then a merged export
def test_adapter_save_load_merge_through_the_module(tiny_llama, tmp_path):
    run = tmp_path / "run"
    main(["fit", *args(tiny_llama, run, "configs/finetune/late.yaml", extra=["--optimizer.init_args.lr=0.05"])])
    method = LoRA(LateLayers(fraction=0.333))
    loaded = lit(tiny_llama, method, adapter=str(run / "adapter")).eval()
    assert lora_targets(loaded.model) and method.resolved_layers == [1]
    batch = answer_batch(loaded)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        adapted = loaded.model(**inputs).logits
        base = lit(tiny_llama).model(**inputs).logits
        assert not torch.allclose(adapted, base, atol=1e-4)
        merged_dir = export_merged(CausalLMSpec(name=str(tiny_llama)), method, run / "adapter", tmp_path / "merged")
        merged = lit(merged_dir).eval()  # a plain save_pretrained directory
        assert not lora_targets(merged.model)
        torch.testing.assert_close(merged.model(**inputs).logits, adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="adapts layers \\[1\\]"):
        lit(tiny_llama, LoRA(LayerList_0()), adapter=str(run / "adapter"))


def LayerList_0():  # noqa: N802
    from lcd.layers import LayerList

    return LayerList([0])


@pytest.mark.slow  # three fits
def test_resume_gives_the_same_adapter(tiny_gemma, tmp_path):
    every2 = tmp_path / "every2.yaml"
    every2.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 2, save_last: true}\n"
        "    - class_path: lcd.callbacks.ConceptDecodability\n"
        "      init_args: {every_n_steps: 2, probe_per_concept: 4, k: 3}\n"
    )
    no_dropout = "--model.init_args.method.init_args.dropout=0.0"  # dropout RNG is not part of a checkpoint
    common = ["--config", str(every2), no_dropout, "--optimizer.init_args.lr=0.01", "--data.init_args.n_train=32",
              "--trainer.limit_val_batches=0"]  # fmt: skip
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    main(["fit", *args(tiny_gemma, straight, "configs/finetune/early.yaml", extra=[*common, "--trainer.max_steps=6"])])
    main(["fit", *args(tiny_gemma, broken, "configs/finetune/early.yaml", extra=[*common, "--trainer.max_steps=4"])])
    main(["fit", *args(tiny_gemma, broken, "configs/finetune/early.yaml", extra=[*common, "--trainer.max_steps=6"]),
          "--ckpt_path=last"])  # fmt: skip
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, msg=name)
    steps = [r["step"] for r in read_history(broken / "cd_history.csv")]
    assert steps == [0, 2, 4, 6]


def test_validate_the_pretrained_baseline(tiny_gemma, tmp_path):
    run = tmp_path / "pretrained"
    main(["validate", *args(tiny_gemma, run, "configs/finetune/early.yaml", extra=["--model.init_args.method=null"])])
    (metrics,) = run.glob("csv/version_*/metrics.csv")
    assert "val/shots_01/acc/concept_AND" in metrics.read_text().splitlines()[0]
    with pytest.raises(SystemExit, match="no finetuning method"):
        main(["fit", *args(tiny_gemma, tmp_path / "x", extra=["--model.init_args.method=null"])])


def test_compare_table_states_what_late_finetuning_cannot_change(tmp_path):
    from lcd.analysis.compare import ConditionResult, write_table

    names = ["A", "B"]

    def result(condition, layers, cds, accs):
        row = {"cd/layer_01": 0.5, **{f"cd/layer_01/concept_{k}": v for k, v in enumerate(cds)}}
        return ConditionResult(condition, condition, layers, 4, dict(zip(names, accs, strict=True)), row, 4, names)

    results = [result("pretrained", None, [0.2, 0.4], [0.1, 0.3]), result("late", [2, 3], [0.2, 0.4], [0.5, 0.7])]
    md = write_table(results, 1, tmp_path, "bitwise")
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [r["condition"] for r in rows] == ["pretrained", "late"]
    assert [float(rows[1][k]) for k in ("cd_mean", "acc_mean", "cd_A", "acc_B")] == pytest.approx([0.3, 60, 0.2, 0.7])
    assert "Late-layer finetuning (layers 2-3) cannot change CD measured at layer 1" in md
    assert "| late | late | 0.30 ± 0.14 | 60.0 ± 14.1 | 0.50 |" in md
    md = write_table([result("late", [1, 3], [0.2, 0.4], [0.5, 0.7])], 1, tmp_path, "bitwise")
    assert "lies inside or above the late group" in md


def test_compare_figure_shows_cd_per_layer_and_accuracy_of_every_condition(tmp_path):
    from lcd.analysis.compare import ConditionResult, write_figure
    from lcd.plotting import plot_compare

    names = ["A", "B"]

    def result(condition, layers, cd, accs):
        row = {f"cd/layer_{i:02d}": v for i, v in enumerate(cd)}
        return ConditionResult(condition, condition, layers, 4, dict(zip(names, accs, strict=True)), row, 3, names)

    results = [result("pretrained", None, [0.2, 0.3, 0.5], [0.1, 0.3])]
    results.append(result("early", [0], [0.2, 0.6, 0.7], [0.5, 0.9]))
    assert write_figure(results, 1, tmp_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cd = {r.condition: [r.cd_row[f"cd/layer_{i:02d}"] for i in range(3)] for r in results}
    fig = plot_compare(cd, {r.condition: r.accuracy for r in results}, 1, {"early": [0]}, 4)
    left, right = fig.axes
    lines = {line.get_label(): list(line.get_ydata()) for line in left.get_lines()}
    assert lines["pretrained"] == [0.2, 0.3, 0.5] and lines["early"] == [0.2, 0.6, 0.7]
    assert list(lines["table's layer 1"]) == [0, 1]  # the dotted line: x stays at layer 1
    (span,) = left.patches  # early's trained layer 0, shaded
    assert span.get_x() == pytest.approx(-0.5) and span.get_width() == pytest.approx(1.0)
    heights = [round(bar.get_height()) for bar in right.patches]
    assert heights == [10, 30, 50, 90]  # per condition, per concept, in %
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["pretrained (20.0)", "early (70.0)"]


def test_compare_locks_each_condition_and_moves_an_unfinished_attempt_aside(tmp_path):
    from lcd.analysis.compare import _condition_dir
    from lcd.rundir import RunDirectoryError, RunLock

    run = tmp_path / "early"  # a condition killed before its result.json: its outputs are kept, aside
    (run / "csv" / "version_0").mkdir(parents=True)
    (run / "csv" / "version_0" / "metrics.csv").write_text("step\n0\n")
    (run / "cd_history.csv").write_text("step\n0\n")
    with _condition_dir(run):
        (aside,) = run.glob("replaced-*")
        assert (aside / "cd_history.csv").read_text() == "step\n0\n" and not (run / "cd_history.csv").exists()
        with pytest.raises(RunDirectoryError, match="in use by another process"):
            RunLock(run).acquire()  # a second compare on the same --out
    lock = RunLock(run)  # released at the end
    lock.acquire()
    lock.release()


@pytest.mark.slow  # four conditions
def test_compare_writes_the_table(tiny_gemma, tmp_path):
    from lcd.analysis.compare import main as compare_main

    out = tmp_path / "compare"
    sets = [f"model.init_args.lm.name={tiny_gemma}", "trainer.callbacks.probe_per_concept=4", "trainer.callbacks.k=3",
            "trainer.max_steps=2"]  # fmt: skip
    common = ["--task", "configs/llm/tasks/bitwise.yaml", "--model", "configs/llm/models/gemma3_270m.yaml",
              "--config", "configs/debug.yaml", "--config", "configs/llm/debug.yaml", "--out", str(out)]  # fmt: skip
    common += [a for s in sets for a in ("--set", s)]
    compare_main(common)
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["condition"] for r in rows] == ["pretrained", "early", "late", "name_concept"]
    names = BitwiseTask().concept_names
    for r in rows:  # each row: its condition's measurements (result.json) at the table's layer, and their means
        cd_row = json.loads((out / r["condition"] / "result.json").read_text())["result"]["cd_row"]
        cds = [cd_row[f"cd/layer_{int(r['layer']):02d}/concept_{k}"] for k in range(len(names))]
        assert [float(r[f"cd_{n}"]) for n in names] == pytest.approx(cds, abs=1e-4)
        assert float(r["cd_mean"]) == pytest.approx(sum(cds) / len(cds), abs=1e-4)
        assert float(r["acc_mean"]) == pytest.approx(100 * sum(float(r[f"acc_{n}"]) for n in names) / 6, abs=1e-2)
        # the pooled classifier over concepts + Null
        assert float(r["cd_pooled"]) == pytest.approx(cd_row[f"cd/layer_{int(r['layer']):02d}"], abs=1e-4)
    assert len({r["layer"] for r in rows}) == 1
    md = (out / "table.md").read_text()
    assert "mean ± sd over 6 concepts" in md and "| late |" in md
    if int(rows[0]["layer"]) == 0:  # measured upstream of the late group (layer 1): CD must equal pretrained
        assert rows[2]["cd_mean"] == rows[0]["cd_mean"] and "cannot change CD" in md
        assert rows[2]["cd_pooled"] == rows[0]["cd_pooled"]
    assert list(out.glob("wandb/offline-run-*")) or list(out.glob("wandb/run-*"))
    assert (out / "compare.png").is_file() and list(out.glob("wandb/*run-*/files/media/images/compare/figure_*.png"))

    # A second call with the same arguments reuses every condition's result.json (no run starts: no new
    # CSV version), with its own measured layer; other arguments fail before anything runs.
    versions = sorted(out.glob("*/csv/version_*"))
    compare_main([*common, "--conditions", "late", "early", "--layer", "1", "--no-wandb"])
    assert sorted(out.glob("*/csv/version_*")) == versions
    again = list(csv.DictReader((out / "table.csv").open()))
    assert [r["condition"] for r in again] == ["early", "late"] and {r["layer"] for r in again} == {"1"}
    assert again[0]["acc_mean"] == rows[1]["acc_mean"]
    with pytest.raises(SystemExit, match="other arguments.*delete"):
        compare_main([*common, "--set", "trainer.max_steps=3", "--conditions", "early", "--layer", "1"])
    assert sorted(out.glob("*/csv/version_*")) == versions
