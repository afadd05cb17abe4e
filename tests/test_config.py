"""Configuration: YAML files, --set overrides, validation, round trip of the resolved config."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jaxrefine.config import Config, config_to_dict, dump_config, load_config
from jaxrefine.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_lists_every_key_with_the_code_defaults():
    from_file = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert from_file == config_to_dict(Config())


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.refine.n_cycles >= 1


def test_overrides_and_types(tmp_path):
    cfg = load_config(CONFIGS / "default.yaml", ["refine.n_cycles=3", "weights.w_a=0.25", "guard.keep_best=false",
                                                   "data.labin=FP,SIGFP", "model.ligands=[a.cif, b.cif]"])
    assert cfg.refine.n_cycles == 3 and cfg.weights.w_a == 0.25 and cfg.guard.keep_best is False
    assert cfg.data.labin == "FP,SIGFP" and cfg.model.ligands == ("a.cif", "b.cif")
    # the resolved config reproduces itself
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_config(cfg))
    assert load_config(out) == cfg


def test_bad_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key refine.n_cycle;"):
        load_config(None, ["refine.n_cycle=3"])
    with pytest.raises(ConfigError, match="refine.strategy = 'everything'; choose one of"):
        load_config(None, ["refine.strategy=everything"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["refine.n_cycles=many"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["n_cycles=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("refine: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
