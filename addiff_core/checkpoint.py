"""Checkpoints: atomic writes, a SHA-256 next to each file, loading without executing code.

A checkpoint is a plain dict ``{"format", "model_config", "state_dict", "meta"}`` saved with
``torch.save`` and read back with ``torch.load(weights_only=True)``: only tensors and plain
Python containers, never pickled objects. ``<file>.sha256`` detects a truncated or corrupted
file before it is used.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ModelConfig, model_config_from_dict
from .errors import CheckpointError

FORMAT = "addiff-fl/1"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plain(obj: Any) -> Any:
    """Tuples -> lists etc. so that the dict is weights_only-loadable and YAML/JSON friendly."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig,
                    meta: dict[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint and its ``.sha256`` file. Returns the path."""
    import io

    payload = {
        "format": FORMAT,
        "model_config": _plain(model_cfg.to_dict()),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "meta": _plain(meta or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path = Path(path)
    atomic_write_bytes(path, data)
    atomic_write_bytes(path.with_name(path.name + ".sha256"), (hashlib.sha256(data).hexdigest() + "\n").encode())
    return path


def load_checkpoint(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """Load (state_dict, model_config, meta). Raises CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    digest_file = path.with_name(path.name + ".sha256")
    if verify and digest_file.exists():
        want = digest_file.read_text().split()[0] if digest_file.read_text().strip() else ""
        if want != sha256_file(path):
            raise CheckpointError(f"{path}: checkpoint is corrupt or truncated (SHA-256 does not match {digest_file.name})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise CheckpointError(f"{path}: not a readable addiff-fl checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an addiff-fl checkpoint (format {payload.get('format') if isinstance(payload, dict) else '?'})")
    try:
        cfg = model_config_from_dict(payload["model_config"], f"{path} (model_config)")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return payload["state_dict"], cfg, payload.get("meta", {})


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """load_state_dict with a clear error when names or shapes do not match the model."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"shape of {wrong[0]} is {tuple(state_dict[wrong[0]].shape)}, model has {tuple(own[wrong[0]].shape)}")
        raise CheckpointError(f"{source}: weights do not fit this model configuration ({detail})")
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state_dict.items()
           if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())}
    if bad:  # a valid SHA-256 only says the file is what was written, not that it is usable
        first = sorted(bad)[0]
        raise CheckpointError(f"{source}: weights hold {sum(bad.values())} NaN/inf value(s) in {len(bad)} tensor(s) "
                              f"(first: {first}); the checkpoint is unusable")
    model.load_state_dict(state_dict)
