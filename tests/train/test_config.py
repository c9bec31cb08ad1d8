"""Config loading: every value checked against its key's type and range when the config is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("yaml")

from fastseg3d.cli import main as cli_main  # noqa: E402
from fastseg3d.train.config import _FREE_LISTS, _TYPES, DEFAULTS, load_config, merge, save_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _leaves(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in ("model.kwargs", "loss.distill_kwargs"):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_every_null_default_declares_its_type():
    # A key whose default is null would otherwise take nothing but null.
    # (data.augment, a list of anything, is checked when the run is set up; data.crop_ratio's default is a value
    # and it takes null too)
    nulls = {key for key, value in _leaves(DEFAULTS).items() if value is None}
    assert nulls - set(_FREE_LISTS) == {key for key, protos in _TYPES.items() if None in protos} - {"data.crop_ratio"}
    assert set(_FREE_LISTS) <= nulls and None in _TYPES["data.crop_ratio"]


@pytest.mark.parametrize("override, match", [
    ("deterministic=maybe", "'deterministic' must be true or false, got 'maybe'"),
    ('data.cache="false"', "'data.cache' must be true or false, got 'false'"),
    ("data.cache=1", "'data.cache' must be true or false"),
    ("train.compile=1", "'train.compile' must be true or false or a string"),
    ("data.spatial_size=[32,32]", r"'data.spatial_size' must be a list of 3 integers \(or an integer for all\)"),
    ("data.spatial_size=[32,32,32.5]", "'data.spatial_size' must be a list of 3 integers"),
    ("data.spatial_size=abc", "'data.spatial_size' must be a list of 3 integers"),
    ("data.spatial_size=[0,32,32]", "'data.spatial_size' values must be >= 1"),
    ("optimizer.betas=0.9", "'optimizer.betas' must be a list of 2 numbers, got 0.9"),
    ("optimizer.betas=[0.9,1.0]", r"'optimizer.betas' values must be in \[0, 1\)"),
    ("val.roi_size=abc", "'val.roi_size' must be null or a list of 3 integers"),
    ("val.roi_size=[32,32,-1]", "'val.roi_size' values must be >= 1"),
    ("data.pixdim=[1.5,1.5]", "'data.pixdim' must be null or a list of 3 numbers"),
    ("data.pixdim=0", "'data.pixdim' values must be > 0"),
    ("data.crop_ratio=[1]", "'data.crop_ratio' must be null or a list of 2 numbers"),
    ("data.crop_ratio=[1,-1]", "'data.crop_ratio' values must be >= 0"),
    ("data.augment={_target_: RandFlipd}", "'data.augment' must be null or a list"),
    ("train.grad_clip=abc", "'train.grad_clip' must be null or a number, got 'abc'"),
    ("train.grad_clip=0", "'train.grad_clip' value must be > 0"),
    ("train.max_steps=abc", "'train.max_steps' must be null or an integer"),
    ("train.max_steps=1.5", "'train.max_steps' must be null or an integer"),
    ("train.max_steps=0", "'train.max_steps' value must be >= 1"),
    ("val.max_cases=true", "'val.max_cases' must be null or an integer"),
    ("train.progress=1", "'train.progress' must be a string or true or false"),
    ("data.root=[a]", "'data.root' must be null or a string"),
    ("name=2024", "'name' must be a string"),
    ("val.overlap=1.0", r"'val.overlap' value must be in \[0, 1\), got 1.0"),
    ("val.overlap=-0.1", r"'val.overlap' value must be in \[0, 1\)"),
    ("train.epochs=0", "'train.epochs' value must be >= 1"),
    ("data.batch_size=0", "'data.batch_size' value must be >= 1"),
    ("data.val_frac=1", r"'data.val_frac' value must be in \(0, 1\)"),
    ("data.flip_prob=1.5", r"'data.flip_prob' value must be in \[0, 1\]"),
    ("optimizer.lr=0", "'optimizer.lr' value must be > 0"),
    ("optimizer.lr=.nan", "'optimizer.lr' value must be > 0, got nan"),
    ("train.grad_accumulation=0", "'train.grad_accumulation' value must be >= 1"),
    ("val.every=-1", "'val.every' value must be >= 0"),
    ("checkpoint.save_every=0", "'checkpoint.save_every' value must be >= 1"),
    # YAML 1.2 booleans: YAML 1.1's yes/no/on/off are strings, which boolean and choice keys refuse by name
    ("deterministic=no", "'deterministic' must be true or false, got 'no'"),
    ("train.channels_last=on", "'train.channels_last' must be true or false, got 'on'"),
    ("train.amp=no", "'train.amp' must be one of 'none', 'bf16', 'fp16', got 'no'"),
    ("seed=-1", r"'seed' value must be in \[0, 1e19\)"),
    ("data.train_seed=" + "9" * 20, r"'data.train_seed' value must be in \[0, 1e19\)"),
    ("data.spatial_size=[32, 32", "override 'data.spatial_size=\\[32, 32': its value is not valid YAML"),
    ("=3", "override '=3' has an empty key"),  # one line naming the override, not a KeyError for the key ''
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("quickstart", [override])


@pytest.mark.parametrize("override, key, value", [
    ("deterministic=true", "deterministic", True),
    ("data.cache=false", "data.cache", False),
    ("data.cache=True", "data.cache", True),
    ("data.spatial_size=32", "data.spatial_size", [32, 32, 32]),  # one side for all three axes
    ("data.spatial_size=[32.0,16,16]", "data.spatial_size", [32, 16, 16]),
    ("val.roi_size=48", "val.roi_size", [48, 48, 48]),
    ("val.roi_size=null", "val.roi_size", None),
    ("data.pixdim=1.5", "data.pixdim", [1.5, 1.5, 1.5]),
    ("data.pixdim=[1,1,2]", "data.pixdim", [1.0, 1.0, 2.0]),
    ("train.grad_clip=1", "train.grad_clip", 1.0),
    ("train.max_steps=20.0", "train.max_steps", 20),
    ("train.max_steps=null", "train.max_steps", None),
    ("train.progress=false", "train.progress", False),
    ("train.progress=auto", "train.progress", "auto"),
    ("val.overlap=0", "val.overlap", 0.0),
    ("val.every=0", "val.every", 0),
    ("optimizer.lr=1e30", "optimizer.lr", 1e30),
    ("backend=torch", "backend", "torch"),
    ("train.grad_clip=.inf", "train.grad_clip", float("inf")),  # (0, inf]: an infinite norm is no clipping
    ("name=a=b", "name", "a=b"),  # the key ends at the first '='; the value keeps the rest
    ("train.max_steps=", "train.max_steps", None),  # an empty value is null
])
def test_good_values_are_typed(override, key, value):
    section, _, name = key.rpartition(".")
    cfg = load_config("quickstart", [override])
    got = cfg[section][name] if section else cfg[name]
    assert got == value and type(got) is type(value)


def test_file_values_are_checked_too(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  cache: 'false'\n")
    with pytest.raises(ValueError, match="'data.cache' must be true or false"):
        load_config(path)
    path.write_text("train:\n  max_steps: 100\n")
    assert load_config(path, ["train.max_steps=null"])["train"]["max_steps"] is None  # an override may unset it


def test_merge_takes_tuples_as_lists():
    cfg = merge(DEFAULTS, {"data": {"spatial_size": (32, 32, 32)}, "val": {"roi_size": (16, 16, 16)}})
    assert cfg["data"]["spatial_size"] == [32, 32, 32] and cfg["val"]["roi_size"] == [16, 16, 16]


def test_cli_reports_a_bad_value_in_one_line(capsys):
    assert cli_main(["train", "--config", "quickstart", "val.overlap=1.0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: config key 'val.overlap' value must be in [0, 1), got 1.0"


def test_a_dotted_key_sets_one_value_of_a_free_form_section():
    # the recipe file's model.kwargs.channels replaced, its other keys and the override's new key kept
    cfg = load_config("dsd_unet", ["model.kwargs.channels=[8, 16, 32]", "model.kwargs.strides=[2, 2]"])
    assert cfg["model"]["kwargs"] == {"channels": [8, 16, 32], "strides": [2, 2]}
    cfg = load_config("quickstart", ["model.kwargs.embed_dims=[8, 16, 32, 64]"])
    assert cfg["model"]["kwargs"]["embed_dims"] == [8, 16, 32, 64]
    assert load_config("quickstart")["model"]["kwargs"]["embed_dims"] == [16, 32, 64, 128]  # the file untouched


def test_the_readme_lists_every_config_key():
    """The README's table of config keys names every key the config takes, so a key added here gets a line there."""
    readme = (CONFIGS.parent / "README.md").read_text()
    table = readme.split("<summary>Every config key", 1)[1].split("</details>", 1)[0]
    rows = {row.split("|")[1] for row in table.splitlines() if row.startswith("| `")}
    named = {key.strip("` ") for cell in rows for key in cell.split(",")}

    def leaves(section, prefix=""):
        for key, value in section.items():
            free = f"{prefix}{key}" in ("model.kwargs", "loss.dice_kwargs", "loss.distill_kwargs")
            if isinstance(value, dict) and not free:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    keys = set(leaves(DEFAULTS))
    assert keys - named == set(), "keys the README's table leaves out"
    assert named - keys == set(), "keys the README's table names that the config does not take"


def test_a_key_written_twice_in_a_file_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys: a section or key written twice would silently lose the first."""
    path = tmp_path / "twice.yaml"
    path.write_text("optimizer:\n  lr: 0.1\noptimizer:\n  name: sgd\n")
    with pytest.raises(ValueError, match="the key 'optimizer' is given twice"):
        load_config(path)


def test_an_empty_file_is_the_defaults(tmp_path):
    """An empty config (or one of comments only) states nothing that differs: it is the defaults."""
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing differs\n")
    assert load_config(path) == load_config()


def test_an_override_below_a_value_set_by_an_earlier_override_is_named():
    """`optimizer=0.1` then `optimizer.lr=...`: a one-line error naming both, not a TypeError from the parser."""
    with pytest.raises(ValueError, match="conflicts with the earlier override of 'optimizer'"):
        load_config("quickstart", ["optimizer=0.1", "optimizer.lr=0.2"])


def test_merge_takes_free_lists_as_lists_and_keeps_a_free_sections_other_keys():
    """A tuple of transforms is stored as a list (safe_dump cannot write a tuple into the run's config); a plain
    mapping merged into a free-form section sets its keys (only a command line's whole mapping replaces it)."""
    flip = {"_target_": "RandFlipd", "keys": ["image", "label"], "prob": 0.3}
    cfg = merge(DEFAULTS, {"data": {"augment": (flip,)}})
    assert cfg["data"]["augment"] == [flip] and isinstance(cfg["data"]["augment"], list)
    cfg = merge(load_config("dsd_unet"), {"loss": {"distill_kwargs": {"temperature": 2.0}}})
    assert cfg["loss"]["distill_kwargs"] == {"temperature": 2.0, "kl_weight": 1.0}


def test_a_split_file_with_a_folder_is_never_a_published_split(tmp_path):
    """A bare name is looked up among the recipes' published splits; a path with a folder that does not exist stays
    as given (the loader's error), never silently a published split of the same name."""
    from fastseg3d.train.config import find_split_file

    assert find_split_file("segformer3d_brats").name == "segformer3d_brats.json"
    missing = tmp_path / "no_such_folder" / "segformer3d_brats"
    assert find_split_file(missing) == missing


def test_the_readme_states_every_keys_default():
    """The README's table of config keys gives each key's default as DEFAULTS holds it (a default changed here
    changes what every recipe that leaves the key out trains with, and the table must say so)."""
    import re

    import yaml

    from fastseg3d.train.config import _loader

    readme = (CONFIGS.parent / "README.md").read_text()
    table = readme.split("<summary>Every config key", 1)[1].split("</details>", 1)[0]
    def leaves(section, prefix=""):
        for key, value in section.items():
            if isinstance(value, dict) and f"{prefix}{key}" not in ("model.kwargs", "loss.dice_kwargs",
                                                                     "loss.distill_kwargs"):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    defaults = dict(leaves(DEFAULTS))
    checked = 0
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        keys = [key.strip("` ") for key in row.split("|")[1].split(",")]
        shown = [None if token == "null" else yaml.load(token.strip("`"), Loader=_loader())
                 for token in re.findall(r"`[^`]*`|\bnull\b", row.split("|")[2])]
        assert len(shown) == len(keys), row
        for key, value in zip(keys, shown):
            assert defaults[key] == value and isinstance(defaults[key], bool) == isinstance(value, bool), key
            checked += 1
    assert checked == len(defaults)
