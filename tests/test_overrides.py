"""Strict command-line overrides: unknown keys, wrong types and misplaced flags stop with the fix named."""

import pytest
from detectron2.config import LazyCall as L
from omegaconf import OmegaConf

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.config import ConfigOverrideError, apply_overrides


def make_head(dim: int = 8, dropout: float = 0.0, roi_refine=None):
    return dim, dropout, roi_refine


def make_any(**kwargs):
    return kwargs


def small_config():
    return OmegaConf.create(
        {
            "train": {"max_iter": 100, "device": "cpu", "amp": {"enabled": False}, "lr": 1e-4, "sizes": [1, 2]},
            "model": L(make_head)(dim=16),
            "loose": L(make_any)(a=1),
            "maybe": None,
        },
        flags={"allow_objects": True},
    )


def test_valid_overrides_are_applied_with_their_types():
    cfg = apply_overrides(
        small_config(),
        ["train.max_iter=2", "train.lr=1", "train.amp.enabled=true", "train.sizes=[3,4]", "maybe=[1]"]
        + ["train.device=0"],
    )
    assert cfg.train.max_iter == 2
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.amp.enabled is True
    assert list(cfg.train.sizes) == [3, 4] and list(cfg.maybe) == [1]
    assert cfg.train.device == "0"  # a string key keeps the text as typed, not the number Hydra parsed


def test_unknown_key_names_the_closest_keys_and_the_plus_spelling():
    cfg = small_config()
    with pytest.raises(ConfigOverrideError, match=r"Unknown config key 'train.max_itr'") as error:
        apply_overrides(cfg, ["train.max_itr=2"])
    assert "Did you mean train.max_iter" in str(error.value)
    assert "+train.max_itr=2" in str(error.value)
    assert "max_itr" not in cfg.train


def test_unknown_key_without_close_match_lists_the_siblings():
    with pytest.raises(ConfigOverrideError, match=r"Keys under 'train\.amp': train\.amp\.enabled"):
        apply_overrides(small_config(), ["train.amp.zzzzzz=1"])


def test_plus_adds_a_new_key_and_refuses_an_existing_one():
    cfg = apply_overrides(small_config(), ["+train.overwrite=true", "++train.max_iter=7", "++train.extra=1"])
    assert cfg.train.overwrite is True and cfg.train.max_iter == 7 and cfg.train.extra == 1
    with pytest.raises(ConfigOverrideError, match=r"already has it; drop the leading '\+'.*train.max_iter=3"):
        apply_overrides(cfg, ["+train.max_iter=3"])


def test_lazycall_nodes_take_every_argument_of_their_target():
    cfg = apply_overrides(small_config(), ["model.dropout=0.1", "model.roi_refine=null", "loose.anything=2"])
    assert cfg.model.dropout == 0.1 and cfg.model.roi_refine is None and cfg.loose.anything == 2
    with pytest.raises(ConfigOverrideError, match=r"Did you mean model.dropout"):
        apply_overrides(small_config(), ["model.dropot=0.1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_iter=abc", "expects an int"),
        ("train.max_iter=1e3", "expects an int"),
        ("train.max_iter=true", "expects an int"),
        ("train.amp.enabled=1", r"expects a bool \(true or false\)"),
        ("train.lr=fast", "expects a float"),
        ("train.sizes=3", r"expects a list, e.g. \[a,b\]"),
        ("train.amp=off", "expects a group of keys"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(override, expected):
    key = override.split("=")[0]
    with pytest.raises(ConfigOverrideError, match=rf"Wrong type for '{key}'.*{expected}.*Write e\.g\. {key}=") as error:
        apply_overrides(small_config(), [override])
    assert error.value.__cause__ is None and error.value.__context__ is None  # one error, not a chain


def test_python_none_spelling_points_to_null():
    with pytest.raises(ConfigOverrideError, match=r"write train.max_iter=null"):
        apply_overrides(small_config(), ["train.max_iter=None"])


def test_flag_after_an_override_says_to_put_flags_first():
    with pytest.raises(ConfigOverrideError, match=r"\['--eval-only'\].*Put flags before the overrides"):
        apply_overrides(small_config(), ["train.max_iter=2", "--eval-only"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_iter", r"Cannot parse the override 'train.max_iter': write it as key=value"),
        ("train.max_iter=1,2", r"is a sweep.*one value per run"),
        ("=3", r"'=3' has no key; write it as key=value"),
        ("train.sizes=[1,", r"Cannot parse the override 'train.sizes=\[1,'.*Parser said: no viable alternative"),
        ("~train.max_iter", r"Deleting keys.*set the key to null instead"),
        ("train.max_iter.x=1", r"inside 'train.max_iter', which is a int value.*set train.max_iter=VALUE"),
        ("maybe.x=1", r"inside 'maybe', which is null.*set maybe=VALUE"),
    ],
)
def test_malformed_overrides_are_named(override, expected):
    with pytest.raises(ConfigOverrideError, match=expected):
        apply_overrides(small_config(), [override])


def test_train_net_refuses_a_typo_before_any_work(tmp_path):
    import train_net

    args = train_net.parse_args(
        ["--config-file", "configs/salience_detr/salience_detr_tiny_synthetic.py", f"train.output_dir={tmp_path}"]
        + ["train.max_itr=2"]
    )
    with pytest.raises(ConfigOverrideError, match="Did you mean train.max_iter"):
        train_net.main(args)
    assert not any(tmp_path.iterdir())
