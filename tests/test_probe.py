"""The LLM probe through the real CLI: CD, accuracy, R², patching, progress, files; every LLM YAML."""

from __future__ import annotations

import csv
import glob
import math
from pathlib import Path

import pytest
import torch
from conftest import config
from tiny_lm import save_tiny_lm

from lcd.cli import main
from lcd.lit import LitProbe
from lcd.tasks import BitwiseTask, make_prompts

CONLLU_ROWS = [
    ("She", "PRON"), ("quickly", "ADV"), ("read", "VERB"), ("the", "DET"), ("old", "ADJ"), ("book", "NOUN"),
    ("in", "ADP"), ("town", "NOUN"), (".", "PUNCT"),
]  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


# --- every LLM YAML through the real CLI ----------------------------------------------------------------


def _run(tmp_path: Path, model_dir: Path, *configs: str, extra: tuple[str, ...] = ()) -> Path:
    args = ["validate", *config("configs/llm/probe.yaml", *configs, "configs/debug.yaml", "configs/llm/debug.yaml")]
    main([*args, f"--model.init_args.lm.name={model_dir}", f"--trainer.default_root_dir={tmp_path}", *extra])
    return tmp_path


def _metrics(run: Path) -> dict[str, float]:
    (path,) = glob.glob(str(run / "csv" / "version_*" / "metrics.csv"))
    rows = list(csv.DictReader(open(path)))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k != "step"}


@pytest.mark.parametrize(
    "arch,model_yaml",
    [("gemma3", "configs/llm/models/gemma3_270m.yaml"), ("llama", "configs/llm/models/smollm2_135m.yaml")],
)
def test_probe_bitwise_with_patching_through_the_cli(tmp_path, arch, model_yaml, monkeypatch, lightning_log, capsys):
    model_dir = save_tiny_lm(tmp_path / "model", arch)

    # A random tiny model answers nothing right: plant exact match = True, so accuracy has a value to get right.
    def planted(predictions, answers):
        return torch.ones(len(answers), dtype=bool)

    monkeypatch.setattr("lcd.lit.probe.exact_match", planted)
    monkeypatch.setattr("lcd.lit.generation.exact_match", planted)  # patching scores through it
    yamls = (model_yaml, "configs/llm/tasks/bitwise.yaml", "configs/llm/patching.yaml")
    run = _run(tmp_path / "run", model_dir, *yamls, extra=("--model.init_args.progress_every_s=0",))
    m = _metrics(run)
    patching_lines = [line for line in lightning_log.lines if line.startswith("probe | patching | ")]
    # the non-Null 4-shot prompts once each, then the means' prompts (50 per class in patching.yaml)
    assert patching_lines and patching_lines[-1].startswith(f"probe | patching | {66 + 7 * 50}/{66 + 7 * 50} prompts")
    for shots in ("01", "04"):
        assert {f"probe/shots_{shots}/cd/layer_00", f"probe/shots_{shots}/cd/layer_01"} <= m.keys()
        cds = [m[f"probe/shots_{shots}/cd/layer_00"], m[f"probe/shots_{shots}/cd/layer_01"]]  # best: the argmax
        assert (m[f"probe/shots_{shots}/cd/best"], m[f"probe/shots_{shots}/cd/best_layer"]) == (
            max(cds),
            cds.index(max(cds)),
        )
        assert m[f"probe/shots_{shots}/acc/concept_XNOR"] == m[f"probe/shots_{shots}/acc/mean"] == 1.0
    assert m["probe/chance"] == pytest.approx(1 / 7)
    assert "probe/shots_04/patch/positive/concept_AND" in m and "probe/shots_04/patch/first_token/negative/mean" in m
    assert m["probe/shots_04/patch/layer"] == m["probe/shots_04/cd/best_layer"]  # patch_layer null: the best CD layer
    rows = list(csv.DictReader(open(run / "probe" / "cd_per_layer.csv")))
    assert [(r["shots"], r["layer"]) for r in rows] == [("1", "0"), ("1", "1"), ("4", "0"), ("4", "1")]
    concepts = list(csv.DictReader(open(run / "probe" / "concepts.csv")))
    assert len(concepts) == 2 * 7 and concepts[-1]["concept"] == "Null" and concepts[-1]["accuracy"] == ""
    patch = list(csv.DictReader(open(run / "probe" / "patching.csv")))
    assert len(patch) == 6 and all(int(r["n"]) == 11 and r["position"] == "query" for r in patch)
    for r in patch:
        assert float(r["base"]) == pytest.approx(m[f"probe/shots_04/acc/concept_{r['concept']}"])
        first = m[f"probe/shots_04/patch/first_token/base/concept_{r['concept']}"]
        assert float(r["base_first_token"]) == pytest.approx(first, abs=1e-4)  # not planted: the real first tokens
    for name in ("probe_cd_per_layer", "probe_cd_vs_accuracy", "probe_patching"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000
    # lcd probes: the run beside itself, its table read back from the probe's files
    from lcd.analysis.probes import read_probe

    read = read_probe(run)
    assert sorted(read) == [1, 4] and read[4]["best_layer"] == m["probe/shots_04/cd/best_layer"]
    assert [r["concept"] for r in read[4]["patching"]] == ["AND", "NAND", "OR", "NOR", "XOR", "XNOR"]
    with pytest.raises(SystemExit):
        main(["probes", str(tmp_path), "--out", str(tmp_path / "none")])
    assert "lcd probes: error: " + str(tmp_path) + " holds no finished probe" in capsys.readouterr().err
    rows = main(["probes", str(run), str(run), "--name", "a", "b", "--out", str(tmp_path / "both")])
    assert [(r["run"], r["shots"]) for r in rows] == [(n, s) for n in "ab" for s in ("1", "4", "all")]
    four = rows[1]
    assert (int(four["best_layer"]), float(four["cd_best"])) == (
        m["probe/shots_04/cd/best_layer"],
        pytest.approx(m["probe/shots_04/cd/best"], abs=1e-3),
    )
    assert float(four["accuracy_mean"]) == pytest.approx(m["probe/shots_04/acc/mean"], abs=1e-3)
    assert float(four["positive_first_token"]) == pytest.approx(
        m["probe/shots_04/patch/first_token/positive/mean"], abs=2e-3
    )
    assert float(four["negative"]) == pytest.approx(m["probe/shots_04/patch/negative/mean"], abs=2e-3)
    assert rows[2]["r2"] == ("nan" if math.isnan(m["probe/r2"]) else f"{m['probe/r2']:.3f}")
    assert (tmp_path / "both" / "probes.png").stat().st_size > 1000 and "| a | 4 |" in (
        tmp_path / "both" / "probes.md"
    ).read_text()


def test_probe_patching_sweeps_layers_and_positions(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "model", "llama")
    extra = ("--model.init_args.patch_layer=[0]", "--model.init_args.patch_position=[answer, query]")
    run = _run(tmp_path / "run", model_dir, "configs/llm/tasks/bitwise.yaml", "configs/llm/patching.yaml", extra=extra)
    m = _metrics(run)
    best = int(m["probe/shots_04/cd/best_layer"])
    assert m["probe/shots_04/patch/layer"] == best  # a sweep always includes the best CD layer, the short keys' one
    rows = list(csv.DictReader(open(run / "probe" / "patching.csv")))
    runs = sorted({(r["position"], int(r["layer"])) for r in rows})
    assert runs == sorted({(p, layer) for p in ("answer", "query") for layer in (0, best)}) and len(rows) == 6 * len(
        runs
    )
    p = "probe/shots_04/patch"
    for position, layer in runs:
        for metric in ("exact", "first_token"):
            for sign in ("base", "positive", "negative"):
                assert f"{p}/{position}/layer_{layer:02d}/{metric}/{sign}/mean" in m
        row = next(r for r in rows if (r["position"], int(r["layer"]), r["concept"]) == (position, layer, "OR"))
        key = f"{p}/{position}/layer_{layer:02d}/first_token"
        assert float(row["negative_first_token"]) - float(row["base_first_token"]) == pytest.approx(
            m[f"{key}/negative/concept_OR"], abs=2e-4
        )
    # the short keys report the first position listed (answer) at the best layer
    assert m[f"{p}/first_token/positive/mean"] == m[f"{p}/answer/layer_{best:02d}/first_token/positive/mean"]
    assert m[f"{p}/negative/concept_XOR"] == m[f"{p}/answer/layer_{best:02d}/exact/negative/concept_XOR"]
    assert (run / "plots" / "probe_patching_layers.png").stat().st_size > 1000


def test_probe_pos_and_conllu_through_the_cli(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "model", "llama")
    gemma = "configs/llm/models/gemma3_270m.yaml"
    m = _metrics(_run(tmp_path / "pos", model_dir, gemma, "configs/llm/tasks/pos_generated.yaml"))
    assert "probe/shots_04/acc/concept_Pronoun" in m and "probe/shots_01/cd/concept_Null" in m
    conllu = tmp_path / "toy.conllu"
    blocks = []
    for s in range(80):  # 80 distinct sentences with all six tags: 16 test sentences, 11 prompts per class
        rows = [(w if w != "book" else f"book{s}", t) for w, t in CONLLU_ROWS]
        blocks.append("\n".join(f"{i}\t{w}\t{w}\t{t}\t_\t_\t0\t_\t_\t_" for i, (w, t) in enumerate(rows, 1)))
    conllu.write_text("\n\n".join(blocks) + "\n\n")
    extra = (f"--data.init_args.task.init_args.conllu_path={conllu}", "--model.init_args.generate=false")
    m = _metrics(_run(tmp_path / "conllu", model_dir, gemma, "configs/llm/tasks/pos.yaml", extra=extra))
    assert "probe/shots_01/cd/best" in m and "probe/shots_01/acc/mean" not in m


def test_bad_options_fail_before_any_work(tmp_path, capsys):
    model_dir = save_tiny_lm(tmp_path / "model", "llama")
    with pytest.raises(SystemExit, match="out of range"):
        _run(tmp_path / "a", model_dir, "configs/llm/tasks/bitwise.yaml", extra=("--model.init_args.layers=[5]",))
    with pytest.raises(SystemExit, match="patch_shots=10"):
        _run(
            tmp_path / "b",
            model_dir,
            "configs/llm/tasks/bitwise.yaml",
            "configs/llm/patching.yaml",
            extra=("--model.init_args.patch_shots=10",),
        )
    with pytest.raises(SystemExit):  # refused by the CLI parser (a Literal option)
        _run(
            tmp_path / "d",
            model_dir,
            "configs/llm/tasks/bitwise.yaml",
            "configs/llm/patching.yaml",
            extra=("--model.init_args.patch_position=everywhere",),
        )
    assert "patch_position" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="out of range"):
        _run(
            tmp_path / "e",
            model_dir,
            "configs/llm/tasks/bitwise.yaml",
            "configs/llm/patching.yaml",
            extra=("--model.init_args.patch_layer=[0, 7]",),
        )
    with pytest.raises(SystemExit, match="does not exist"):  # lcd.errors prints it last, exit 2
        _run(tmp_path / "c", tmp_path / "nowhere.gguf", "configs/llm/tasks/bitwise.yaml")


def test_probe_saves_answers_and_r2_and_prints_one_table_per_shot_count(tmp_path, capsys, lightning_log):
    model_dir = save_tiny_lm(tmp_path / "model", "llama")
    run = _run(tmp_path / "run", model_dir, "configs/llm/tasks/bitwise.yaml")  # debug: 1 and 4 shots, 11 per class
    m = _metrics(run)
    answers = list(csv.DictReader(open(run / "probe" / "answers.csv")))
    assert len(answers) == 2 * 77
    names = BitwiseTask().label_names
    for shots in (1, 4):
        rows = [r for r in answers if r["shots"] == str(shots)]
        prompts = make_prompts(BitwiseTask(), shots, 11, "test", seed=0)  # the datamodule's evaluation set
        assert [int(r["prompt"]) for r in rows] == list(range(77))  # prompt order, though served longest first
        assert [(r["concept"], r["gold"]) for r in rows] == [(names[p.concept], p.answer) for p in prompts]
        assert all(r["correct"] == str(int(r["answer"] == r["gold"])) for r in rows)
        for name in names[:-1]:
            hits = [int(r["correct"]) for r in rows if r["concept"] == name]
            assert m[f"probe/shots_{shots:02d}/acc/concept_{name}"] == pytest.approx(sum(hits) / len(hits))
    summary = {r["shots"]: r for r in csv.DictReader(open(run / "probe" / "summary.csv"))}
    assert list(summary) == ["1", "4", "all"] and summary["all"]["prompts"] == "154"
    for shots in ("01", "04"):
        row = summary[str(int(shots))]
        assert float(row["cd_best"]) == pytest.approx(m[f"probe/shots_{shots}/cd/best"], abs=1e-4)
        assert float(row["accuracy_mean"]) == pytest.approx(m[f"probe/shots_{shots}/acc/mean"], abs=1e-4)
        r2 = m[f"probe/shots_{shots}/r2"]
        assert math.isnan(r2) if row["r2"] == "nan" else float(row["r2"]) == pytest.approx(r2, abs=1e-4)
    r2 = m["probe/r2"]
    assert (
        math.isnan(r2) if summary["all"]["r2"] == "nan" else float(summary["all"]["r2"]) == pytest.approx(r2, abs=1e-4)
    )
    out = capsys.readouterr().out
    assert "DataLoader 0" not in out and "probe/shots_01/cd/layer_00" not in out  # Lightning's table is off
    logged = "\n".join(lightning_log.lines)
    for shots in (1, 4):
        assert f"probe | {shots} shots | 77 prompts in" in logged
        best = int(m[f"probe/shots_{shots:02d}/cd/best_layer"])
        assert f"best CD {m[f'probe/shots_{shots:02d}/cd/best']:.3f} at layer {best}" in logged
    assert "XNOR" in logged and f"CD@{best}" in logged
    assert any(" prompts | " in line and "tokens/s" in line and "left ~" in line for line in lightning_log.lines)


def test_a_stopped_probe_keeps_every_finished_shot_count(tmp_path, monkeypatch):
    model_dir = save_tiny_lm(tmp_path / "model", "llama")
    step = LitProbe.validation_step

    def stop_at_four_shots(self, batch, batch_idx, dataloader_idx=0):
        if dataloader_idx == 1 and batch_idx == 1:
            raise RuntimeError("stopped by the user")
        return step(self, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(LitProbe, "validation_step", stop_at_four_shots)
    with pytest.raises(RuntimeError, match="stopped"):
        _run(tmp_path / "run", model_dir, "configs/llm/tasks/bitwise.yaml")
    probe = tmp_path / "run" / "probe"
    assert {r["shots"] for r in csv.DictReader(open(probe / "cd_per_layer.csv"))} == {"1"}
    assert len(list(csv.DictReader(open(probe / "answers.csv")))) == 77
    assert [r["shots"] for r in csv.DictReader(open(probe / "summary.csv"))] == ["1", "all"]
    assert (tmp_path / "run" / "plots" / "probe_cd_per_layer.png").stat().st_size > 1000
    assert not list(probe.glob("*.tmp"))


# --- the real model (slow; CI runs it) ----------------------------------------------------------------


@pytest.mark.slow
def test_gemma3_270m_probe_finds_concepts_above_chance(gemma_bitwise_probe):
    run, _, _ = gemma_bitwise_probe  # conftest: the Gemma YAMLs through `lcd validate`, 4 shots, 15 per class, k 10
    m = _metrics(run)
    chance = m["probe/chance"]
    cds = sorted(m[f"probe/shots_04/cd/concept_{c}"] for c in ["AND", "NAND", "OR", "NOR", "XOR", "XNOR"])
    assert m["probe/shots_04/cd/best"] > 2 * chance
    assert cds[-1] > 3 * chance and cds[-2] > 2 * chance  # the best-encoded concepts stand well above chance
    assert len(list(csv.DictReader(open(run / "probe" / "cd_per_layer.csv")))) == 18


def test_probe_without_null_class(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "model", "llama")
    extra = ("--data.init_args.include_null=false", "--data.init_args.eval_shots=[1]")
    m = _metrics(_run(tmp_path / "run", model_dir, "configs/llm/tasks/bitwise.yaml", extra=extra))
    assert m["probe/chance"] == pytest.approx(1 / 6) and "probe/shots_01/cd/concept_Null" not in m


def test_probe_report_counts_padding_and_formats_for_people(tmp_path):
    from lcd.lit.probe_report import Progress, batched_tokens, duration, number, write_csv

    assert batched_tokens([3, 10, 4, 9, 5], batch_size=2) == (5, 2 * 10 + 2 * 5 + 1 * 3)  # longest first
    assert batched_tokens([3, 10, 4, 9, 5], batch_size=2, n_batches=1) == (2, 20)
    progress = Progress({1: (4, 100), -1: (2, 100)}, every_s=3600)
    first = progress.update(1, 2, 40, 50)
    assert first.startswith("probe | 1 shots | 2/4 prompts | ") and "(whole probe incl. patching)" in first
    assert progress.update(1, 2, 40, 50) is None  # the next line is due in an hour
    assert (duration(59.6), duration(3723)) == ("1m00s", "1h02m03s")
    assert (number(None), number(float("nan")), number(0.12345)) == ("", "nan", "0.1235")
    write_csv(tmp_path / "a.csv", ["x", "y"], [[1, 2]])
    assert (tmp_path / "a.csv").read_text().splitlines() == ["x,y", "1,2"] and not list(tmp_path.glob("*.tmp"))
