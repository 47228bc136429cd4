"""A Weights & Biases logger that runs offline by itself when there is no account or no network."""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

_DIR_VARS = {
    "WANDB_DIR": "",
    "WANDB_CACHE_DIR": "wandb/cache",
    "WANDB_CONFIG_DIR": "wandb/config",
    "WANDB_DATA_DIR": "wandb/data",
}
_OWNED_ENV: dict[str, str] = {}  # variables this module set, with the value it set


def _set_owned_env(var: str, value: str) -> None:
    """Set ``var`` unless the user set it themselves (a value we set earlier may be replaced)."""
    if var not in os.environ or _OWNED_ENV.get(var) == os.environ[var]:
        os.environ[var] = _OWNED_ENV[var] = value


def _wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def _has_credentials(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> tuple[str, str]:
    """Decide the W&B mode: ``WANDB_MODE`` if set, else online only with credentials and a network.

    Returns:
        (mode, reason).

    """
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode, f"WANDB_MODE={mode}"
    host = _wandb_host()
    if not _has_credentials(host):
        return "offline", "no W&B credentials (run `wandb login` to sync online)"
    if not _reachable(host):
        return "offline", f"{host} is unreachable"
    return "online", "credentials and network found"


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger that keeps every W&B file under ``save_dir`` and never hangs offline.

    Without ``WANDB_API_KEY``/``wandb login`` or without a network it logs offline (one log line says
    so); sync later with ``wandb sync <save_dir>/wandb/offline-run-*``. ``WANDB_MODE`` overrides the
    choice (``online``, ``offline``, ``disabled``). W&B's run, cache, config and artifact directories
    are placed under ``save_dir`` unless already set in the environment. ``save_dir`` defaults to the
    trainer's run directory when used through the lcd CLI.

    Args:
        project: W&B project.
        name: Run name shown in W&B.
        save_dir: Directory for W&B files.
        log_model: Upload checkpoints as W&B artifacts (see Lightning's WandbLogger).
        **kwargs: Passed to Lightning's WandbLogger and on to ``wandb.init``.

    """

    def __init__(
        self,
        project: str = "lcd",
        name: str | None = None,
        save_dir: str = ".",
        log_model: bool | str = False,
        **kwargs: Any,
    ) -> None:
        root = Path(save_dir)
        root.mkdir(parents=True, exist_ok=True)
        for var, sub in [
            ("WANDB_DIR", ""),
            ("WANDB_CACHE_DIR", "wandb/cache"),
            ("WANDB_CONFIG_DIR", "wandb/config"),
            ("WANDB_DATA_DIR", "wandb/data"),
        ]:
            os.environ.setdefault(var, str((root / sub).resolve()))
        mode, reason = wandb_mode()
        if kwargs.get("offline"):
            mode, reason = "offline", "offline=True"
        _set_owned_env("WANDB_MODE", mode)  # DDP workers make the same choice without re-probing
        if mode != "online":
            rank_zero_info(f"W&B logging {mode} ({reason}); files under {root.resolve()}")
        kwargs.pop("offline", None)
        super().__init__(
            project=project,
            name=name,
            save_dir=str(root),
            log_model=log_model,
            offline=mode == "offline",
            mode=mode,
            **kwargs,
        )

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Finish the W&B run, so the next run in this process (a sweep, a test) gets its own.

        A later ``validate``/``test`` with this logger continues the same run: the id is kept and
        W&B resumes it.
        """
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger whose ``save_dir`` defaults to the run directory under the lcd CLI.

    Args:
        save_dir: Directory of the CSV files (``<save_dir>/<name>/version_<n>/metrics.csv``).
        name: Sub-directory name.
        **kwargs: Passed to Lightning's CSVLogger.

    """

    def __init__(self, save_dir: str = ".", name: str = "csv", **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, name=name, **kwargs)
