"""evaluate_json, visualize_data and visualize_json_results on the tiny generated dataset."""

import json

import pytest
from conftest import TINY_SPEC
from PIL import Image

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.data import SyntheticSpec, register_synthetic_datasets
from salience_detr.tools import evaluate_json, visualize_data, visualize_json_results


@pytest.fixture
def val_set(tiny_synthetic_cache):
    infos = register_synthetic_datasets(prefix="tools_tiny", cache_dir=str(tiny_synthetic_cache), **TINY_SPEC)
    return infos["val"]


def _results_from_ground_truth(json_file, shift=0.0, score=0.9):
    coco = json.loads(open(json_file).read())
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], a["bbox"][2], a["bbox"][3]],
            "score": score,
        }
        for a in coco["annotations"]
    ]


def test_evaluate_json_scores_ground_truth_100_and_shifted_boxes_lower(val_set, tmp_path):
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps(_results_from_ground_truth(val_set["json_file"])))
    metrics = evaluate_json.main(
        ["--dataset", val_set["name"], "--json", str(perfect), "--output", str(tmp_path / "m.json")]
    )
    assert metrics["AP"] == pytest.approx(100.0)
    assert json.loads((tmp_path / "m.json").read_text())["AP50"] == pytest.approx(100.0)
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps(_results_from_ground_truth(val_set["json_file"], shift=0.3)))
    worse = evaluate_json.main(["--dataset", val_set["name"], "--json", str(shifted)])
    assert worse["AP50"] == pytest.approx(100.0) and worse["AP"] < 60.0


def test_evaluate_json_counts_images_without_results_unless_told(val_set, tmp_path):
    results = _results_from_ground_truth(val_set["json_file"])
    first_image = results[0]["image_id"]
    path = tmp_path / "first_image_only.json"
    path.write_text(json.dumps([r for r in results if r["image_id"] == first_image]))
    args = ["--dataset", val_set["name"], "--json", str(path)]
    assert evaluate_json.main(args)["AP"] < 100.0
    assert evaluate_json.main(args + ["--only-result-images"])["AP"] == pytest.approx(100.0)


def test_evaluate_json_registers_a_dataset_from_paths(val_set, tmp_path):
    results = tmp_path / "r.json"
    results.write_text(json.dumps(_results_from_ground_truth(val_set["json_file"])))
    args = ["--dataset", "tools_from_paths", "--json", str(results)]
    metrics = evaluate_json.main(args + ["--coco-json", val_set["json_file"], "--image-root", val_set["image_root"]])
    assert metrics["AP"] == pytest.approx(100.0)


def test_evaluate_json_bad_inputs(val_set, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        evaluate_json.main(["--dataset", val_set["name"], "--json", str(tmp_path / "nothing.json")])
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(ValueError, match="needs image_id, category_id, bbox, score"):
        evaluate_json.main(["--dataset", val_set["name"], "--json", str(wrong)])
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}]))
    with pytest.raises(ValueError, match="not in"):
        evaluate_json.main(["--dataset", val_set["name"], "--json", str(foreign)])
    with pytest.raises(KeyError, match="not registered"):
        evaluate_json.main(["--dataset", "never_registered", "--json", str(foreign)])


def test_visualize_data_draws_every_image(val_set, tmp_path):
    written = visualize_data.main(["--dataset", val_set["name"], "--output", str(tmp_path / "gt")])
    assert len(written) == TINY_SPEC["num_val"]
    assert all(Image.open(p).mode == "RGB" for p in written)


def test_visualize_json_results_puts_predictions_next_to_ground_truth(val_set, tmp_path):
    results = _results_from_ground_truth(val_set["json_file"])
    results.append({**results[0], "score": 0.1})
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    args = ["--input", str(path), "--dataset", val_set["name"], "--output", str(tmp_path / "vis"), "--num-images", "2"]
    written = visualize_json_results.main(args + ["--conf-threshold", "0.5"])
    assert len(written) == 2
    coco = json.loads(open(val_set["json_file"]).read())
    first = coco["images"][0]
    assert Image.open(written[0]).size == (2 * first["width"], first["height"])
    instances = visualize_json_results.results_to_instances(results[:1], (96, 96), {1: 0, 2: 1, 3: 2, 4: 3, 5: 4})
    assert instances.pred_classes.tolist() == [results[0]["category_id"] - 1]
    with pytest.raises(ValueError, match="category id 77"):
        visualize_json_results.results_to_instances([{**results[0], "category_id": 77}], (96, 96), {1: 0})


def test_spec_folder_matches_registration(val_set, tiny_synthetic_cache):
    assert SyntheticSpec(**TINY_SPEC).folder_name() in val_set["json_file"]
