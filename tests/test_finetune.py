"""Loading weights: strict by default, one logged exception for fine-tuning on other classes, clear file errors.

The end-to-end test follows the README's "Fine-tune on your own dataset" on a generated 3-class dataset.
"""

import logging
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.engine import AtomicDetectionCheckpointer, CheckpointFileError, CheckpointMismatchError
from salience_detr.engine.weights import MAX_UNFIT_FRACTION, class_head_keys

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/salience_detr/salience_detr_tiny_synthetic.py"
EXPECTED_GROUPS = {"decoder class heads", "encoder proposal class head", "denoising label embedding"}


def _tiny_model(num_classes: int, seed: int = 0) -> torch.nn.Module:
    cfg = LazyConfig.load(str(TINY))
    cfg.model.num_classes = num_classes
    torch.manual_seed(seed)
    return instantiate(cfg.model)


@pytest.fixture(scope="module")
def five_class_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("five")
    AtomicDetectionCheckpointer(_tiny_model(5, seed=1), str(folder)).save("model_five")
    return folder / "model_five.pth"


def test_fine_tuning_reinitialises_exactly_the_class_heads(five_class_checkpoint, caplog):
    model = _tiny_model(3)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="salience_detr.engine.weights"):
        AtomicDetectionCheckpointer(model, allow_new_classes=True).load(str(five_class_checkpoint))
    saved = torch.load(five_class_checkpoint)["model"]
    heads = {key for keys in class_head_keys(model).values() for key in keys}
    assert len(heads) == 11  # 3 decoder layers x (weight, bias), encoder head and its alias x 2, label embedding
    for key, value in model.state_dict().items():
        if key in heads:
            assert torch.equal(value, before[key]), f"{key} is not the model's own initialisation"
        else:
            assert torch.equal(value, saved[key]), f"{key} differs from the checkpoint"
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Re-initialised")]
    assert len(logged) == 3 and all("the config has 3" in line for line in logged)
    assert {line.split(" (")[0].removeprefix("Re-initialised ") for line in logged} == EXPECTED_GROUPS


def test_other_classes_without_fine_tuning_name_both_numbers(five_class_checkpoint):
    with pytest.raises(CheckpointMismatchError, match=r"has 5 classes but .* model.num_classes=3"):
        AtomicDetectionCheckpointer(_tiny_model(3)).load(str(five_class_checkpoint))


def test_resume_never_changes_the_class_heads(five_class_checkpoint, tmp_path):
    AtomicDetectionCheckpointer(_tiny_model(5), str(tmp_path)).save("model_0000009")
    checkpointer = AtomicDetectionCheckpointer(_tiny_model(3), str(tmp_path), allow_new_classes=True)
    with pytest.raises(CheckpointMismatchError, match="5 classes"):
        checkpointer.resume_or_load(str(five_class_checkpoint), resume=True)
    assert checkpointer.allow_new_classes, "a failed resume must not change the checkpointer's policy"


def test_any_other_shape_mismatch_is_an_error(five_class_checkpoint, tmp_path):
    data = torch.load(five_class_checkpoint)
    data["model"]["transformer.tgt_embed.weight"] = torch.zeros(7, 128)
    torch.save(data, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"transformer.tgt_embed.weight: \(7, 128\) in the checkpoint"):
        AtomicDetectionCheckpointer(_tiny_model(5), allow_new_classes=True).load(str(tmp_path / "bad.pth"))


def test_a_checkpoint_of_another_model_is_refused_with_counts(tmp_path):
    r50 = instantiate(LazyConfig.load(str(REPO / "configs/models/salience_detr_r50.py")).model)
    torch.save({"model": r50.state_dict(), "metadata": {"config_file": "configs/x/r50.py"}}, tmp_path / "r50.pth")
    with pytest.raises(CheckpointMismatchError) as error:
        AtomicDetectionCheckpointer(_tiny_model(5), allow_new_classes=True).load(str(tmp_path / "r50.pth"))
    message = str(error.value)
    assert f"more than {MAX_UNFIT_FRACTION:.0%}" in message and "--config-file configs/x/r50.py" in message
    fit, total = (int(word) for word in message.split("only ")[1].split(" tensors")[0].split(" of "))
    assert total == len(r50.state_dict()) and fit / total < 1 - MAX_UNFIT_FRACTION


def test_backbone_only_pkl_weights_load(tmp_path):
    """A detectron2/torchvision-style .pkl of the backbone (names without the model's prefix, an fc classifier):
    detectron2's name matching places it, the transformer keeps its initialisation."""
    model = _tiny_model(5)
    state = model.state_dict()
    backbone = {key.removeprefix("backbone."): state[key].numpy() + 1.0 for key in state if key.startswith("backbone.")}
    weights = {**backbone, "fc.weight": torch.zeros(1000, 512).numpy(), "fc.bias": torch.zeros(1000).numpy()}
    with open(tmp_path / "R-18.pkl", "wb") as file:
        pickle.dump({"model": weights, "__author__": "torchvision", "matching_heuristics": True}, file)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    AtomicDetectionCheckpointer(model, allow_new_classes=True).load(str(tmp_path / "R-18.pkl"))
    for key, value in model.state_dict().items():
        expected = before[key] + 1.0 if key.startswith("backbone.") else before[key]
        assert torch.equal(value, expected), key


def test_a_text_file_as_checkpoint_names_the_fix(tmp_path):
    (tmp_path / "notes.pth").write_text("model: my weights\n")
    with pytest.raises(CheckpointFileError, match="not a readable checkpoint") as error:
        AtomicDetectionCheckpointer(_tiny_model(5)).load(str(tmp_path / "notes.pth"))
    assert "weights_only" not in str(error.value) and "train_net.py" in str(error.value)


def test_missing_checkpoint_file_names_the_fix(tmp_path):
    with pytest.raises(CheckpointFileError, match=r"does not exist.*train.init_checkpoint="):
        AtomicDetectionCheckpointer(_tiny_model(5)).load(str(tmp_path / "absent.pth"))


def test_offline_download_names_the_url_and_the_fix(monkeypatch):
    checkpointer = AtomicDetectionCheckpointer(_tiny_model(5))

    def offline(path, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(checkpointer.path_manager, "get_local_path", offline)
    with pytest.raises(CheckpointFileError) as error:
        checkpointer.load("detectron2://ImageNetPretrained/torchvision/R-50.pkl")
    message = str(error.value)
    assert "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/R-50.pkl" in message
    assert "train.init_checkpoint=/path/to/R-50.pkl" in message


def _train(config: Path, overrides: list[str], *flags: str) -> None:
    import train_net

    train_net.main(train_net.parse_args(["--config-file", str(config), *flags, *overrides]))


SHORT_RUN = [
    "train.max_iter=1",
    "train.eval_period=0",
    "train.checkpointer.period=1",
    "train.log_period=1",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "dataloader.train.mapper.min_sizes=[96]",
    "dataloader.train.mapper.max_size=128",
    "dataloader.train.mapper.crop_pre_sizes=[96]",
    "dataloader.train.mapper.crop_size=[64,96]",
    "dataloader.test.mapper.test_min_size=96",
    "dataloader.test.mapper.test_max_size=128",
]


@pytest.fixture(scope="module")
def pretrained_tiny(tiny_synthetic_cache, tmp_path_factory) -> Path:
    """The tiny config trained one iteration on the built-in 5-class data: the stand-in for a COCO checkpoint."""
    from conftest import TINY_SPEC

    out = tmp_path_factory.mktemp("pretrain")
    spec = [f"datasets.synthetic.{key}={value}" for key, value in TINY_SPEC.items()]
    _train(TINY, spec + SHORT_RUN + [f"datasets.synthetic.cache_dir={tiny_synthetic_cache}", f"train.output_dir={out}"])
    for spare in set(out.glob("model_*.pth")) - {out / "model_final.pth"}:
        spare.unlink()  # copies of the same weights (177 MB each) that would stay on disk until the suite ends
    return out / "model_final.pth"


def _assert_only_class_heads_reinitialised(config: Path, datasets: list[str], checkpoint: Path) -> None:
    """On the loading path training uses: the class heads keep the model's own init, the rest is the checkpoint."""
    from salience_detr.config import load_config

    cfg = load_config(str(config), datasets)
    assert cfg.model.num_classes == 3
    model = instantiate(cfg.model)
    fresh = {key: value.clone() for key, value in model.state_dict().items()}
    AtomicDetectionCheckpointer(model, allow_new_classes=True).load(str(checkpoint))
    saved = torch.load(checkpoint)["model"]
    changed = {key for key, value in model.state_dict().items() if not torch.equal(value, saved[key])}
    heads = {key for keys in class_head_keys(model).values() for key in keys}
    assert changed == heads and all(torch.equal(model.state_dict()[key], fresh[key]) for key in heads)


def _demo_with_and_without_the_dataset(config: Path, datasets: list[str], alone: list[str], image: str, out: Path):
    """The demo runs in both situations and labels with the dataset's class names, or the checkpoint's."""
    from demo_loading import load_demo_cli
    from own_dataset import THREE_CLASSES

    demo_cli = load_demo_cli("salience_detr_finetune_demo_cli")
    from predictor import dataset_metadata

    from salience_detr.config import load_config

    for name, overrides in (("with_data", datasets + alone[2:]), ("alone", alone)):
        argv = ["--config-file", str(config), "--input", image, "--output", str(out / name), "--opts", *overrides]
        assert demo_cli.main(argv) == 0
        assert (out / name / Path(image).name).is_file()
        labels = dataset_metadata(load_config(str(config), overrides, inference=True)).thing_classes
        assert labels == list(THREE_CLASSES), name


def _export_and_benchmark(config: Path, weights: Path, alone: list[str], image: str, out: Path) -> None:
    from salience_detr.tools import benchmark, export_onnx

    onnx = out / "my_dataset.onnx"
    # one iteration leaves near-tied low scores (~0.02) whose top-K order can differ between runtimes; the
    # tolerance here only has to let the export of this barely trained model through, not judge its precision
    export = ["--config-file", str(config), "--output", str(onnx), "--image", image, "--tolerance", "50"]
    report = export_onnx.main(export + ["--opts", *alone])
    assert onnx.is_file() and report["num_detections"] > 0
    timing = ["--device", "cpu", "--height", "96", "--width", "96", "--num-iter", "1", "--warmup", "0"]
    bench_args = ["--config-file", str(config), "--weights", str(weights), *timing, "--output", str(out / "b.json")]
    assert benchmark.main(bench_args + ["--opts", *alone[:2]])["results"]


@pytest.mark.slow
def test_readme_fine_tune_on_your_own_dataset(pretrained_tiny, tmp_path):
    """The README section, step by step, on a generated 3-class dataset: config -> train -> eval -> demo -> export
    -> benchmark, with the class heads re-initialised and everything else loaded from the 5-class checkpoint."""
    from own_dataset import THREE_CLASSES, dataset_overrides, write_three_class_split, write_user_config

    from salience_detr.data import SyntheticSpec

    spec = SyntheticSpec(num_train=6, num_val=2, image_size=96, max_objects=3, min_object_size=12, max_object_size=48)
    data = tmp_path / "data"
    for split in ("train", "val"):
        write_three_class_split(data, split, spec)
    config = write_user_config(tmp_path)
    datasets = dataset_overrides(data, "readme")
    run = tmp_path / "output" / "my_dataset"

    _assert_only_class_heads_reinitialised(config, datasets, pretrained_tiny)
    _train(config, datasets + SHORT_RUN + [f"train.init_checkpoint={pretrained_tiny}", f"train.output_dir={run}"])
    log = (run / "log.txt").read_text()
    assert all(f"Re-initialised {group}" in log for group in EXPECTED_GROUPS)
    weights = run / "model_best.pth"
    assert torch.load(weights)["metadata"]["thing_classes"] == list(THREE_CLASSES)
    assert (run / "last_checkpoint").read_text() == "model_final.pth"

    evaluation = [f"train.init_checkpoint={weights}", f"train.output_dir={tmp_path / 'ev'}"]
    _train(config, datasets + SHORT_RUN + evaluation, "--eval-only")
    assert (tmp_path / "ev" / "inference" / "coco_instances_results.json").is_file()

    # fresh dataset names for the user who has only the config and the .pth: this session registered the defaults
    alone = ["datasets.train.name=alone_train", "datasets.val.name=alone_val", f"train.init_checkpoint={weights}"]
    image = str(data / "val" / "0000.png")
    _demo_with_and_without_the_dataset(config, datasets, alone, image, tmp_path / "demo")
    _export_and_benchmark(config, weights, alone, image, tmp_path)
