"""Site-file and model-config validation: every wrong field gets a precise error."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from addiff_core.config import ConfigError, load_site_config, model_config_from_dict, resolve_device

REPO = Path(__file__).resolve().parents[1]


def write_site(tmp_path: Path, **fields) -> Path:
    data = {"name": "hospital_x", "data_dir": "cases"}
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not ...}
    p = tmp_path / "site.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_minimal_site_defaults_and_relative_paths(tmp_path):
    cfg = load_site_config(write_site(tmp_path))
    assert cfg.name == "hospital_x"
    assert cfg.data_dir == (tmp_path / "cases").resolve()
    assert cfg.state_dir == (tmp_path / "state" / "hospital_x").resolve()
    assert cfg.device == "auto"
    assert cfg.privacy.enabled is False
    assert cfg.heldout.fraction == 0.25 and cfg.heldout.case_ids is None


def test_explicit_heldout_ids(tmp_path):
    cfg = load_site_config(write_site(tmp_path, heldout={"case_ids": ["c1", "c2"]}))
    assert cfg.heldout.case_ids == ("c1", "c2")
    assert cfg.heldout.fraction is None


@pytest.mark.parametrize("fields, expected", [
    ({"name": ...}, "name: is required"),
    ({"name": "bad name!"}, "name: must be letters"),
    ({"data_dir": ...}, "data_dir: is required"),
    ({"device": "gpu0"}, "device: must be auto, cpu, cuda or cuda:N"),
    ({"heldout": {"fraction": 1.5}}, "heldout.fraction: must be <"),
    ({"heldout": {"case_ids": "c1"}}, "heldout.case_ids: must be a list"),
    ({"heldout": {"case_ids": ["c1"], "fraction": 0.2}}, "give either case_ids or fraction"),
    ({"training": {"batch_size": 0}}, "training.batch_size: must be >= 1"),
    ({"training": {"batch_size": 2.5}}, "training.batch_size: must be an integer"),
    ({"training": {"lr": -1}}, "training.lr: must be >"),
    ({"training": {"optimizer": "lbfgs"}}, "training.optimizer: must be one of"),
    ({"training": {"epochs": 3}}, "training.epochs: unknown field"),
    ({"privacy": {"enabled": "yes"}}, "privacy.enabled: must be true or false"),
    ({"privacy": {"delta": 1.0}}, "privacy.delta: must be <"),
    ({"privacy": {"target_epsilon": 0}}, "privacy.target_epsilon: must be >"),
    ({"privacy": {"accountant": "gdp"}}, "privacy.accountant: must be one of"),
    ({"model": {"grid": {"size": 30}}}, "grid: size 30 must be divisible"),
    ({"model": {"grid": {"spacing": [1, 2]}}}, "model.grid.spacing: must be three positive numbers"),
    ({"model": {"num_heads": 3}}, "num_heads: must divide context_dim"),
    ({"model": {"kind": "gan"}}, "model.kind: must be one of"),
    ({"extra_field": 1}, "extra_field: unknown field"),
    ({"training": [1, 2]}, "training: must be a mapping"),
])
def test_site_file_errors_name_file_and_field(tmp_path, fields, expected):
    path = write_site(tmp_path, **fields)
    with pytest.raises(ConfigError) as e:
        load_site_config(path)
    assert str(path) in str(e.value)
    assert expected in str(e.value)


def test_not_yaml_and_missing_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site_config(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_site_config(tmp_path / "nope.yaml")
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_site_config(p)


def test_yaml_is_read_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo hacked']\ndata_dir: x\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site_config(p)


def test_model_config_latent_size():
    cfg = model_config_from_dict({"grid": {"size": 64}, "vae_channels": [8, 16, 32, 64]})
    assert cfg.downsample == 8 and cfg.latent_size == 8


def test_device_resolution_errors_for_missing_gpu():
    import torch

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda:3")
    else:
        with pytest.raises(ConfigError, match="only"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_repo_site_files_are_valid():
    sites = sorted((REPO / "sites").glob("*.yaml"))
    assert sites, "sites/ holds the demo site files"
    for p in sites:
        cfg = load_site_config(p)
        assert cfg.name
