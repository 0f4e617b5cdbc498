"""Shared fixtures: a tiny generated shapes dataset (a few 96 px images) instead of the full synthetic set."""

import pytest

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)

TINY_SPEC = dict(num_train=8, num_val=4, image_size=96, max_objects=3, min_object_size=12, max_object_size=48, seed=3)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs longer than a few seconds (training runs, subprocesses)")


@pytest.fixture(scope="session")
def tiny_synthetic_cache(tmp_path_factory):
    """Cache folder holding the tiny dataset, generated once per test session."""
    from salience_detr.data import SyntheticSpec, ensure_synthetic_dataset

    cache_dir = tmp_path_factory.mktemp("synthetic_cache")
    ensure_synthetic_dataset(SyntheticSpec(**TINY_SPEC), cache_dir)
    return cache_dir
