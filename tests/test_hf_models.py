"""Loading causal LMs: presets, local dirs, GGUF cache, offline hub names failing fast, every model YAML."""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import config
from tiny_lm import save_tiny_lm

from lcd.cli import main
from lcd.models.hf import PRESETS, CausalLMSpec, cache_root, load_causal_lm, resolve_source

HUB_PRESET_YAMLS = [
    "configs/llm/models/llama3.1_8b.yaml",
    "configs/llm/models/llama3.1_70b.yaml",
    "configs/llm/models/gemma2_2b.yaml",
    "configs/llm/models/gemma2_9b.yaml",
    "configs/llm/models/gemma2_27b.yaml",
]
PROBE = ["configs/llm/probe.yaml", "configs/llm/tasks/bitwise.yaml"]


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    """No test may see (or fill) a real Hugging Face cache, nor reach the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture
def connections(monkeypatch) -> list:
    """Every host lookup and connection the code under test attempts (each refused; the list must stay empty)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[-1] if len(args) == 2 else args[:2])  # connect(sock, address); getaddrinfo(host, port)
        raise OSError(f"test: no network {attempts[-1]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: a missing model must be reported before one."""

    def load(self):
        raise AssertionError("a model load was attempted")

    monkeypatch.setattr(CausalLMSpec, "load", load)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_local_directory_loads_with_left_padding_and_depth(tmp_path, arch):
    path = save_tiny_lm(tmp_path / arch, arch)
    lm = load_causal_lm(str(path), dtype="bfloat16")
    assert lm.n_layers == 2 and lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token_id == 0
    assert next(lm.model.parameters()).dtype == torch.bfloat16 and not lm.model.training
    assert lm.source == str(path.resolve())


def test_bad_names_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gemma-nonexistent'"):
        resolve_source("gemma-nonexistent")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_source(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(str(save_tiny_lm(tmp_path / "m")), dtype="int8")


def test_hub_name_missing_offline_fails_at_once_saying_how_to_use_a_local_copy(monkeypatch, connections):
    # At once: from the local cache alone, without trying the network, even where HF_HUB_OFFLINE is not set.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # read when huggingface_hub was imported
    with pytest.raises(FileNotFoundError, match="point at a local copy"):
        CausalLMSpec(name="meta-llama/Llama-3.1-8B").check()
    with pytest.raises(FileNotFoundError, match="google/gemma-2-2b"):
        resolve_source("gemma-2-2b")
    assert connections == []


def test_presets_and_cache_dir(monkeypatch, tmp_path):
    assert PRESETS["llama-3.1-70b"] == "meta-llama/Llama-3.1-70B" and PRESETS["gemma-2-27b"] == "google/gemma-2-27b"
    monkeypatch.setenv("LCD_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert resolve_source("gemma3-270m").kind == "gguf"  # no weights touched yet


@pytest.mark.parametrize("preset", HUB_PRESET_YAMLS)
def test_hub_preset_yaml_fails_fast_through_the_cli(preset, tmp_path, connections, no_model_load):
    # Fast: when the model is built from the config, before any load, run directory or network connection.
    args = ["validate", *config(PROBE[0], preset, PROBE[1], "configs/debug.yaml", "configs/llm/debug.yaml")]
    with pytest.raises(SystemExit, match="point at a local copy"):  # printed as the last line, exit 2
        main([*args, f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert connections == [] and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_smollm2_preset_runs_through_the_cli(tmp_path, real_models):  # real_models: SmolLM2 is in the cache
    yamls = [PROBE[0], "configs/llm/models/smollm2_135m.yaml", PROBE[1], "configs/debug.yaml", "configs/llm/debug.yaml"]
    args = ["validate", *config(*yamls)]
    main([*args, f"--trainer.default_root_dir={tmp_path}", "--data.init_args.eval_shots=[1]"])
    rows = (tmp_path / "probe" / "cd_per_layer.csv").read_text().splitlines()
    assert len(rows) == 1 + 30  # SmolLM2-135M has 30 layers


@pytest.mark.slow
def test_gemma3_second_load_reads_the_cache_not_the_gguf(real_models, monkeypatch):
    # real_models: Gemma was loaded once already (in a fresh cache that load dequantized the GGUF and wrote the
    # copy). How long each load takes is measured by benchmarks/model_load.py.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_root() / "models" / "gemma3-270m"
    weights = cached / "model.safetensors"
    written = weights.stat().st_mtime_ns
    calls = []  # (class, where from, keyword arguments) of every transformers load
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def from_pretrained(location, *args, _cls=cls, _real=real, **kwargs):
            calls.append((_cls.__name__, str(location), kwargs))
            return _real(location, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)
    lm = load_causal_lm("gemma3-270m")
    assert sorted(name for name, _, _ in calls) == ["AutoModelForCausalLM", "AutoTokenizer"]
    assert all(where == str(cached) and "gguf_file" not in kwargs for _, where, kwargs in calls), calls
    assert weights.stat().st_mtime_ns == written  # read, not written again
    assert lm.source == str(cached) and lm.n_layers == 18
    ids = lm.tokenizer(["Paris is the capital of"], return_tensors="pt")  # and the weights make sense
    out = lm.model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert lm.tokenizer.decode(out[0, ids["input_ids"].shape[1] :]).split()[0] == "France"
