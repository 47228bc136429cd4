"""Read the history rows of an offline W&B run from its ``.wandb`` file (the SDK has no public reader).

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version), then LevelDB-log records
in 32 KiB blocks (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last), each holding a
protobuf ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator[pb.Record]:
    """Every record of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, parts = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FIRST, _MIDDLE):
            parts = chunk if kind == _FIRST else parts + chunk
            continue
        record = pb.Record()
        record.ParseFromString(chunk if kind == _FULL else parts + chunk)
        yield record


def history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The history rows of an offline run directory (``.../wandb/offline-run-*``), values decoded from JSON."""
    (path,) = Path(run_dir).glob("*.wandb")
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


def kept_by_wandb(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows W&B keeps of a run logged in several parts (a run and its resumptions, in order).

    W&B ignores a row whose step is not above the last step the run already has ("Steps must be
    monotonically increasing, so this data will be ignored").
    """
    kept: list[dict[str, Any]] = []
    for rows in runs:
        for row in rows:
            if not kept or row["_step"] > kept[-1]["_step"]:
                kept.append(row)
    return kept
