"""``addiff predict`` with a stand-in model: the prescription everywhere in the evaluation region
(plausible, deterministic, no checkpoint needed). tests/test_hostile_outputs.py and
tests/test_hidden_folders.py."""
from __future__ import annotations

from pathlib import Path

import torch

from addiff_core.config import GridConfig, ModelConfig


def use_rx_model(monkeypatch) -> Path:
    """Patch ``addiff_core.predict`` to predict with the stand-in; returns a checkpoint path to pass
    (never read)."""
    import addiff_core.predict as predict

    def ones(model, batch, cfg, *, steps=None, seed=0, num_samples=1):
        return torch.ones(batch["ct"].shape), (0.1 * torch.ones(batch["ct"].shape) if num_samples > 1 else None)

    monkeypatch.setattr(predict, "load_model",
                        lambda ckpt, dev: (torch.nn.Identity(), ModelConfig(grid=GridConfig(size=16)), {}))
    monkeypatch.setattr(predict, "predict_normalised", ones)
    return Path("stand-in.pt")
