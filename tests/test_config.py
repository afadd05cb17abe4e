"""Configuration: YAML files, --set overrides, validation, round trip of the resolved config."""
from __future__ import annotations

import re
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


@pytest.mark.parametrize("override, message", [
    ("refine.n_cycles=-1", "refine.n_cycles = -1: must be >= 0"),
    ("refine.n_cycles=1.7", "refine.n_cycles: expected an integer, got 1.7"),
    ("refine.n_cycles=true", "refine.n_cycles: expected an integer"),
    ("weights.w_a=-5", "weights.w_a = -5: must be a number > 0 or 'auto'"),
    ("weights.w_a=banana", "weights.w_a = 'banana': must be a number > 0 or 'auto'"),
    ("weights.w_a=0", "weights.w_a = 0: must be a number > 0"),
    ("refine.b_min=300", "refine.b_min = 300.0 and refine.b_max = 300.0: b_min must be smaller than b_max"),
    ("data.d_min=3", None),  # alone it is fine ...
    ("data.d_max=nan", "data.d_max: expected a finite number"),
    ("data.free_fraction=0", "data.free_fraction = 0.0: must be in (0, 0.5]"),
    ("refine.learning_rate=0", "refine.learning_rate = 0.0: must be > 0"),
    ("refine.b_shift_scale=0", "refine.b_shift_scale = 0.0: must be > 0"),
    ("refine.joint_xyz_b=banana", "refine.joint_xyz_b = 'banana'; choose one of auto, on, off"),
    ("refine.gn_steps=-1", "refine.gn_steps = -1: must be a whole number >= 0 or 'auto'"),
    ("refine.gn_steps=2.5", "refine.gn_steps = 2.5: must be a whole number >= 0 or 'auto'"),
    ("refine.converge_rtol=-1e-4", "refine.converge_rtol = -0.0001: must be a number >= 0 or 'auto'"),
    ("refine.converge_rtol=fast", "refine.converge_rtol = 'fast': must be a number >= 0 or 'auto'"),
    ("solvent.update_every=0", "solvent.update_every = 0: must be > 0"),
    ("waters.max_hbond=2", "waters.min_hbond = 2.4 and waters.max_hbond = 2.0"),
    ("guard.keep_best=2", "guard.keep_best: expected true or false, got 2"),
    ("model.ligands=5", "model.ligands: expected a list, got 5"),
    ("data.labin=5", "data.labin: expected text, got 5"),
    ("model.place_translation=[1, 2]", "model.place_translation = (1, 2): needs 0 or 3 numbers, got 2"),
    ("model.place_rotation=[a, b, c]", "model.place_rotation = ('a', 'b', 'c'): must be numbers"),
    ("runtime.grid_steps=-1", "runtime.grid_steps = -1: must be a whole number >= 0 or 'auto'"),
    ("runtime.cell_range=[50, 60, 70]", "runtime.cell_range = [50, 60, 70]: must be auto, []"),
    ("runtime.cell_range=[[a, b, c, d, e, f], [1, 2, 3, 4, 5, 6]]", "must be auto"),
    ("runtime.cell_range=[[50, 60, 70, 90, 90, 90], [49, 60, 70, 90, 90, 90]]", "lowest <= highest"),
    ("runtime.cell_range=[[50, 60, 70, 90, 90, 90], [51, 60, 70, 90, 90, 190]]", "angles in (0, 180)"),
])
def test_values_are_checked_on_load(override, message):
    if message is None:
        assert load_config(None, [override]).data.d_min == 3.0
        with pytest.raises(ConfigError, match=r"data.d_min = 3.0 and data.d_max = 2.0: d_min must be smaller"):
            load_config(None, [override, "data.d_max=2"])
        return
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith("--set ") and message in str(info.value)


def test_gn_steps_takes_a_count_or_auto():
    assert load_config(None, ["refine.gn_steps=3"]).refine.gn_steps == 3
    assert load_config(None, ["refine.gn_steps=auto"]).refine.gn_steps == "auto"


def test_converge_rtol_auto_is_looser_where_coordinates_and_b_move_together():
    from jaxrefine.refine.blocks import CONVERGE_RTOL_BLOCKS, CONVERGE_RTOL_JOINT, converge_rtol_for
    from jaxrefine.refine.engine import LoopSettings

    assert load_config(None, []).refine.converge_rtol == "auto"
    assert CONVERGE_RTOL_JOINT > CONVERGE_RTOL_BLOCKS
    auto = load_config(None, [])
    assert LoopSettings.from_config(auto, 1.7).converge_rtol == CONVERGE_RTOL_JOINT  # joint below 2.5 Å
    assert LoopSettings.from_config(auto, 2.9).converge_rtol == CONVERGE_RTOL_BLOCKS
    apart = load_config(None, ["refine.joint_xyz_b=off"])
    assert LoopSettings.from_config(apart, 1.7).converge_rtol == CONVERGE_RTOL_BLOCKS
    assert LoopSettings.from_config(load_config(None, ["refine.converge_rtol=0"]), 1.7).converge_rtol == 0.0
    assert converge_rtol_for(3e-5, True) == 3e-5


def test_file_errors_name_the_file(tmp_path):
    for text, message in (("- 1\n", "expected a mapping of sections"), ("refine: 5\n", "config section 'refine' must be a mapping"),
                          ("refine:\n  n_cycles: -2\n", "refine.n_cycles = -2: must be >= 0")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="c.yaml: " + message.replace("(", r"\(").replace(".", r"\.")):
            load_config(path)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_integers_written_as_floats_are_accepted():
    cfg = load_config(None, ["refine.n_cycles=3.0", "weights.w_a=auto", "data.free_value=null"])
    assert cfg.refine.n_cycles == 3 and isinstance(cfg.refine.n_cycles, int) and cfg.weights.w_a == "auto"


def _package_source_without_config() -> str:
    pkg = Path(__file__).resolve().parents[1] / "jaxrefine"
    return "\n".join(p.read_text() for p in pkg.rglob("*.py") if p.name != "config.py")


def test_every_config_key_is_read_somewhere():
    """A key nobody reads is a promise the program does not keep (issue 16: b_max, seed, ccp4_maps)."""
    from jaxrefine.restraints import GeometryWeights

    source = _package_source_without_config()
    unread = []
    for section, keys in config_to_dict(Config()).items():
        for key in keys:
            by_name = section == "weights" and key in GeometryWeights._fields  # read as getattr(cfg.weights, field)
            if not by_name and not re.search(rf"\.{key}\b", source):
                unread.append(f"{section}.{key}")
    assert unread == []


def test_choice_lists_are_defined_once():
    from jaxrefine import config
    from jaxrefine.cli import build_parser

    refine = build_parser()._subparsers._group_actions[0].choices["refine"]
    choices = {a.dest: a.choices for a in refine._actions if a.choices}
    assert choices["strategy"] is config.STRATEGY_SETTINGS and choices["target"] is config.TARGETS
    with pytest.raises(ConfigError, match="choose one of " + ", ".join(config.OPTIMIZERS)):
        load_config(None, ["refine.optimizer=newton"])


def test_grid_steps_and_cell_range_take_their_forms():
    for value, loaded in (("16", 16), ("auto", "auto"), ("0", 0)):
        assert load_config(None, [f"runtime.grid_steps={value}"]).runtime.grid_steps == loaded
    span = [[50, 60, 70, 90, 90, 90], [51, 61, 71, 90, 90, 90]]
    assert load_config(None, [f"runtime.cell_range={span}"]).runtime.cell_range == span
    assert load_config(None, ["runtime.cell_range=[]"]).runtime.cell_range == []
    assert load_config(None, []).runtime.cell_range == "auto"
