import pytest
import torch

from salience_detr.tools.roi_ablation import BASELINE, METRICS, base_weights, roi_twin, table


def test_every_salience_detr_config_has_its_roi_twin(tmp_path):
    assert roi_twin(BASELINE).endswith("salience_detr_tiny_synthetic_roi.py")
    lonely = tmp_path / "lonely.py"
    lonely.write_text("")
    with pytest.raises(FileNotFoundError, match="lonely_roi.py"):
        roi_twin(str(lonely))


def test_table_lists_every_run_and_the_mean_over_seeds():
    rows = [{"variant": "baseline", "seed": seed, **{m: 10.0 + seed for m in METRICS}} for seed in (0, 2)]
    rows.append({"variant": "roi: head on", "seed": 0, **{m: 5.0 for m in METRICS}})
    lines = table(rows).splitlines()
    assert len(lines) == 2 + 3 + 1  # header, rule, three runs, one mean (a single seed has no spread)
    assert lines[-1].startswith("| **baseline**, mean ± sd | 2 seeds | 11.0 ± 1.4 |")


def test_table_gives_the_paired_difference_to_the_head_off_run_of_each_seed():
    rows = [{"variant": "roi: head off", "seed": seed, **{m: 10.0 for m in METRICS}} for seed in (0, 1)]
    rows += [
        {"variant": "roi: head on", "seed": seed, **{m: 10.0 + delta for m in METRICS}}
        for seed, delta in ((0, 1), (1, -0.5))
    ]
    last = table(rows).splitlines()[-1]
    assert last.startswith("| **roi: head on minus head off**, mean (range) | 2 seeds | +0.2 (-0.5 to +1.0) |")


def test_head_only_arm_starts_from_the_seeds_base_without_the_head(tmp_path):
    with pytest.raises(FileNotFoundError, match="seed 0 needs a trained base"):
        base_weights(tmp_path, 0)
    (tmp_path / "roi_seed0").mkdir()
    joint = {"backbone.w": torch.ones(2), "roi_refine.w": torch.zeros(3)}
    torch.save({"model": joint, "iteration": 599}, tmp_path / "roi_seed0" / "model_final.pth")
    stripped = torch.load(base_weights(tmp_path, 0), weights_only=False)
    assert list(stripped["model"]) == ["backbone.w"]
    (tmp_path / "base_seed0").mkdir()
    (tmp_path / "base_seed0" / "model_final.pth").write_bytes(b"")
    assert base_weights(tmp_path, 0) == tmp_path / "base_seed0" / "model_final.pth"
