"""Every value of a run config is checked when the config is built: a number outside its domain,
a value of the wrong type or shape, a bad YAML file or a bad ``--set`` is one ValueError naming
the key (and the file / line where there is one)."""
import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moh.config import load_yaml
from moh.train.config import RunConfig, check_data_args
from moh.train.engine import _check

from .conftest import SMOKE

BASE = yaml.safe_load(SMOKE.read_text())
STEPS = BASE["train"]["steps"]


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# key -> what an accepted value must satisfy (written here independently of the code under test)
DOMAIN = {
    "optim.lr": lambda v: _num(v) and v > 0,
    "optim.weight_decay": lambda v: _num(v) and v >= 0,
    "optim.eps": lambda v: _num(v) and v > 0,
    "optim.min_lr_ratio": lambda v: _num(v) and 0 <= v <= 1,
    "optim.grad_clip": lambda v: _num(v) and v >= 0,
    "optim.warmup_steps": lambda v: _int(v) and 0 <= v <= STEPS,
    "train.steps": lambda v: _int(v) and v >= max(1, BASE["optim"]["warmup_steps"]),
    "train.batch_size": lambda v: _int(v) and v >= 1,
    "train.grad_accum": lambda v: _int(v) and v >= 1,
    "train.log_every": lambda v: _int(v) and v >= 1,
    "train.eval_every": lambda v: _int(v) and v >= 0,
    "train.eval_batches": lambda v: _int(v) and v >= 0,
    "train.save_every": lambda v: _int(v) and v >= 0,
    "train.keep_last": lambda v: _int(v) and v >= 0,
    "train.num_workers": lambda v: _int(v) and v >= 0,
    "train.seed": lambda v: _int(v) and 0 <= v < 2**32,
}

values = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 2.5, 3.0, -0.0, 1e-12, True, False, None, "", "x", "1e-3", "3", [], [1], {}]),
)


def _build(key: str, value):
    data = yaml.safe_load(SMOKE.read_text())
    section, name = key.split(".")
    data[section][name] = value
    return RunConfig.from_dict(data)


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(sorted(DOMAIN)), value=values)
def test_every_numeric_key_is_checked(key, value):
    try:
        cfg = _build(key, value)
    except ValueError as e:
        assert key in str(e), f"error for {key}={value!r} does not name the key: {e}"
        return
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert DOMAIN[key](got), f"{key}={value!r} was accepted as {got!r}, outside its domain"
    assert got == value or (isinstance(value, str) and float(value) == got)  # converted, not changed


@settings(max_examples=150, deadline=None)
@given(betas=st.one_of(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
                       st.floats(), st.none(), st.text(max_size=3)))
def test_betas(betas):
    try:
        cfg = _build("optim.betas", betas)
    except ValueError as e:
        assert "optim.betas" in str(e)
        return
    assert len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas)


@pytest.mark.parametrize("override, expect", [
    ("optim.min_lr_ratio=-0.5", r"optim\.min_lr_ratio=-0\.5 must be in \[0, 1\]"),
    ("optim.min_lr_ratio=1.5", r"optim\.min_lr_ratio=1\.5"),
    ("optim.weight_decay=-0.1", r"optim\.weight_decay=-0\.1"),
    ("optim.lr=0", r"optim\.lr=0\.0 must be a finite number > 0"),
    ("optim.eps=0", r"optim\.eps=0\.0"),
    ("optim.betas=[0.9, 1.0]", r"optim\.betas=\[0\.9, 1\.0\] must be two numbers in \[0, 1\)"),
    ("optim.betas=[-0.1, 0.9]", r"optim\.betas"),
    ("optim.betas=0.9", r"optim\.betas.* must be a list"),
    ("optim.warmup_steps=11", r"optim\.warmup_steps=11 is longer than the run \(train\.steps=10\)"),
    ("train.eval_batches=-1", r"train\.eval_batches=-1"),
    ("train.keep_last=-1", r"train\.keep_last=-1"),
    ("train.out_dir=''", r"train\.out_dir=''"),
    ("train.seed=-1", r"train\.seed=-1"),
    ("train.seed=null", r"train\.seed.* needs a value"),
    ("train.seed=", r"train\.seed.* needs a value"),
    ("train.seed=[1, 2]", r"train\.seed.* must be int"),
    ("train.steps=2.5", r"train\.steps.* must be int, got 2\.5"),
    ("train.progress=maybe", r"train\.progress.* must be bool"),
    ("train=[1, 2]", r"config section 'train' must be a mapping"),
    ("model=3", r"config section 'model' must be a mapping"),
    ("data.args=5", r"data\.args.* must be a mapping"),
    ("train.seed={a: 1, a: 2}", r"duplicate key 'a'"),
    ("train.seed=[1", r"override 'train\.seed=\[1', line 1"),
    ("train..seed=1", r"not a key path"),
])
def test_bad_values_and_overrides_name_the_key(override, expect):
    with pytest.raises(ValueError, match=expect):
        RunConfig.load(SMOKE, [override])


def test_warmup_equal_to_the_run_is_allowed():
    assert RunConfig.load(SMOKE, ["optim.warmup_steps=10"]).optim.warmup_steps == 10


@pytest.mark.parametrize("text, expect", [
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("train:\n  seed: 1\n  seed: 2\n", r"line 3 column 3: invalid YAML: duplicate key 'seed' \(first on line 2\)"),
    ("train:\n  seed: [1\n", r"line 3 .*invalid YAML"),
    ("train: {steps: 3\n", "invalid YAML"),
    ("- model\n- data\n", "must hold a mapping, got list"),
    ("just a string\n", "must hold a mapping, got str"),
    ("train: 3\n", "config section 'train' must be a mapping, got 3"),
    ("train:\n  - steps\n", "config section 'train' must be a mapping"),
])
def test_bad_yaml_files_are_named(tmp_path, text, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=expect) as e:
        RunConfig.load(path)
    if "section" not in expect:
        assert str(path) in str(e.value)


def test_a_directory_or_binary_file_as_config_is_named(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_yaml(tmp_path)
    (tmp_path / "b.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="b.yaml"):
        load_yaml(tmp_path / "b.yaml")


@pytest.mark.parametrize("override, expect", [
    ("model.overrides.top_k=2.5", r"top_k.* must be int, got 2\.5"),
    ("model.overrides.dim=abc", r"dim.* must be int, got 'abc'"),
    ("model.overrides.top_k=9", r"top_k=9"),  # checked per layer by MoHConfig before anything is built
    ("model.overrides.bogus=1", r"bogus"),
    ("model.name=no-such-model", r"no-such-model"),
])
def test_bad_model_values_are_named_before_anything_is_built(override, expect):
    cfg = RunConfig.load(SMOKE, ["model.name=moh-vit-tiny-50", override])
    with pytest.raises(ValueError, match=expect):
        _check(cfg)


def test_whole_floats_are_ints():
    cfg = RunConfig.load(SMOKE, ["train.steps=4.0", "model.overrides.depth=2.0"])
    assert cfg.train.steps == 4 and isinstance(cfg.train.steps, int)
    _check(cfg)


def test_unknown_data_args_name_the_key_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"data\.args\.sizes.*valid keys: \['image_size', 'in_chans', 'num_classes', "
                                         r"'seed', 'size'\]"):
        check_data_args("random-images", {"sizes": 3})
    with pytest.raises(ValueError, match=r"data\.args\.size.* must be int, got 2\.5"):
        check_data_args("random-images", {"size": 2.5})
    with pytest.raises(ValueError, match="no-such-data"):
        check_data_args("no-such-data", {})
    assert check_data_args("random-images", {"size": 64.0}) == {"size": 64}
    cfg = RunConfig.load(SMOKE, ["data.args.bogus=1"])
    with pytest.raises(ValueError, match=r"data\.args\.bogus"):
        _check(cfg)
