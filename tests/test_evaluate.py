"""Evaluation loaders, protocols, the evaluate command and the table scripts on tiny real-format fixtures."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from timm.models import save_for_hf

from conftest import TINY_MODELS, cli_error, tiny_model
from relevance_finetune import evaluate as ev
from relevance_finetune.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
A_WNIDS = ev.imagenet_synsets()[6], ev.imagenet_synsets()[11]  # first two ImageNet-A classes
VAL_WNIDS = ev.imagenet_synsets()[:2]                            # classes 0 and 1
# the "after" model ignores the image: 1000-way ranking 0 > 6 > 11 > 530 > 2 > everything else
BIAS = {0: 3.0, 6: 2.0, 11: 1.0, 530: 0.5, 2: 0.25}


def _write_images(folder: Path, count: int, suffix: str = ".jpg", size=(40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"img_{i}{suffix}")


def write_gtsegs(path: Path, images: list[np.ndarray], masks: list[np.ndarray]) -> None:
    """An HDF5 file laid out as MATLAB v7.3 writes gtsegs_ijcv.mat (cells = object references)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs, value = f.create_group("#refs#"), f.create_group("value")
        img_refs = np.empty((len(images), 1), dtype=h5py.ref_dtype)
        gt_refs = np.empty((len(masks), 1), dtype=h5py.ref_dtype)
        for i, image in enumerate(images):
            img_refs[i, 0] = refs.create_dataset(f"img{i}", data=image.transpose(2, 1, 0)).ref  # (3, W, H)
        for i, mask in enumerate(masks):
            inner = refs.create_dataset(f"gt{i}", data=mask.T.astype(np.uint8))  # (W, H)
            cell = np.empty((1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = inner.ref
            gt_refs[i, 0] = refs.create_dataset(f"gtcell{i}", data=cell).ref
        value.create_dataset("img", data=img_refs)
        value.create_dataset("gt", data=gt_refs)
        wnid = np.frombuffer("n01440764".encode("utf-16-le"), dtype=np.uint16)[:, None]
        value.create_dataset("target", data=np.array([[refs.create_dataset("t0", data=wnid).ref]],
                                                     dtype=h5py.ref_dtype))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")


def write_imagenet9(root: Path, variants: dict[str, int]) -> None:
    """The Backgrounds Challenge release layout: <variant>/val/<NN_class>/*.JPEG, plus fg_mask/ (.npy)."""
    for variant, grey in variants.items():
        for name in ev.IN9_CLASSES:
            folder = root / variant / "val" / name
            folder.mkdir(parents=True)
            Image.fromarray(np.full((24, 24, 3), grey, dtype=np.uint8)).save(folder / "n0_1.JPEG")
    (root / "fg_mask/val/00_dog").mkdir(parents=True)
    np.save(root / "fg_mask/val/00_dog/n0_1.npy", np.ones((24, 24), dtype=bool))


class RuleModel(nn.Module):
    """A 1000-class stand-in that predicts ``rule(images)``: exact, hand-checkable scores."""
    num_classes = 1000

    def __init__(self, rule) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.rule = rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.rule(x), 1000).float() * 5 + self.weight


def _segmentation_samples(count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, masks = [], []
    for _ in range(count):
        image = np.zeros((20, 30, 3), dtype=np.uint8)  # H=20, W=30; red left half, blue right half
        image[:, :15, 0], image[:, 15:, 2] = 255, 255
        mask = np.zeros((20, 30), dtype=np.uint8)
        mask[:, :15] = 1
        images.append(image)
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for wnid in VAL_WNIDS:
        _write_images(root / "imagenet/val" / wnid, 2, ".JPEG")
        _write_images(root / "sketch" / wnid, 1)
    for wnid in A_WNIDS:
        _write_images(root / "imagenet-a" / wnid, 2)
    (root / "imagenet-a/README.txt").write_text("ImageNet-A")
    r_wnids = [ev.imagenet_synsets()[i] for i in ev._subset_indices("r")[:2]]
    for wnid in r_wnids:
        _write_images(root / "imagenet-r" / wnid, 1)
    for index in ("0", "2", "10"):
        _write_images(root / "imagenetv2-matched-frequency-format-val" / index, 1, ".jpeg")
    objectnet = root / "objectnet-1.0"
    _write_images(objectnet / "images/alarm_clock", 2, ".png")
    _write_images(objectnet / "images/air_freshener", 1, ".png")  # no ImageNet counterpart
    maps = objectnet / "mappings"
    maps.mkdir(parents=True)
    (maps / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"alarm_clock": "Alarm clock", "air_freshener": "Air freshener"}))
    (maps / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Alarm clock": "analog clock; digital clock"}))
    (maps / "imagenet_to_label_2012_v2").write_text("tench, Tinca tinca\nanalog clock\ndigital clock\n")
    (maps / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({"0": 0, "409": 1, "530": 2}))
    for split in ("area", "rotation", "location20_area02_min0pc"):
        for label in ("bagel", "banana"):
            _write_images(root / "si-score" / split / label, 1)
    (root / "si-score/area/metadata.csv").write_text("id,label\n")
    write_gtsegs(root / "gtsegs_ijcv.mat", *_segmentation_samples(3))
    write_imagenet9(root / "bg_challenge", {"original": 200, "mixed_same": 200, "mixed_rand": 20})
    (root / "set_a.txt").write_text(f"{VAL_WNIDS[0]}\n6\n")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """A random tiny 1000-class ViT as a local-dir model, and biased weights for it."""
    root = tmp_path_factory.mktemp("models")
    model = tiny_model("vit_cls", num_classes=1000)
    save_for_hf(model, str(root / "tiny"), model_args=TINY_MODELS["vit_cls"][1])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"].zero_()
    state["head.bias"].zero_()
    for cls, value in BIAS.items():
        state["head.bias"][cls] = value
    (root / "ckpt/ViT-B/ours-annotated").mkdir(parents=True)
    save_file(state, str(root / "ckpt/ViT-B/ours-annotated/best.safetensors"))  # a train run folder
    (root / "ckpt/DeiT-B").symlink_to(root / "ckpt/ViT-B")
    return {"model": f"local-dir:{root / 'tiny'}", "biased": str(root / "ckpt/ViT-B/ours-annotated"),
            "checkpoints": str(root / "ckpt")}


def _common(data_root: Path, out: Path) -> list[str]:
    return ["--data-root", str(data_root), "--out", str(out), "--workers", "0", "--batch-size", "4",
            "--no-progress", "--device", "cpu"]


# -- protocols and loaders -------------------------------------------------------------------------
def test_topk_correct_protocols():
    logits = torch.zeros(2, 1000)
    logits[:, 10], logits[:, 7], logits[:, 3] = 3.0, 2.0, 1.0
    targets = [(3,), (5, 7)]  # a single class, and a multi-class (ObjectNet-like) target
    standard = ev.topk_correct(logits, targets, (3, 5, 7), "standard")
    paper = ev.topk_correct(logits, targets, (3, 5, 7), "paper")
    assert standard[1].tolist() == [False, True]  # subset argmax is 7: any mapped class counts
    assert paper[1].tolist() == [False, False]    # 1000-way argmax is 10
    assert paper[5].tolist() == [True, False]     # top-5 holds 3 but the first target 5 is not in it
    with pytest.raises(ValueError, match="protocol"):
        ev.topk_correct(logits, targets, None, "other")


def test_loaders_read_real_layouts(data_root):
    a = ev.load_eval_set("imagenet-a", data_root / "imagenet-a")
    assert len(a) == 4 and len(a.subset) == 200 and {t for t in a.targets} == {(6,), (11,)}
    v2 = ev.load_imagenet_v2(data_root / "imagenetv2-matched-frequency-format-val")
    assert v2.classes == ["0", "2", "10"] and v2.targets == [(0,), (2,), (10,)]
    objectnet = ev.load_objectnet(data_root / "objectnet-1.0")
    assert len(objectnet) == 2 and objectnet.targets[0] == (409, 530) and objectnet.subset == (409, 530)
    assert objectnet.border == 2
    si = ev.load_si_score(data_root / "si-score/area")
    assert sorted(set(zip(si.classes, si.targets))) == [("bagel", (931,)), ("banana", (954,))]


def test_loader_errors_name_what_was_expected(data_root, tmp_path):
    bad = tmp_path / "imagenet-a"
    _write_images(bad / ev.imagenet_synsets()[0], 1)  # tench is not an ImageNet-A class
    with pytest.raises(ValueError, match="not one of the expected wnids"):
        ev.load_wnid_folders(bad, "imagenet-a", subset="a")
    with pytest.raises(FileNotFoundError, match="folder_to_objectnet_label.json"):
        ev.load_objectnet(tmp_path)
    _write_images(tmp_path / "v2/abc", 1)
    with pytest.raises(ValueError, match="integer class folders"):
        ev.load_imagenet_v2(tmp_path / "v2")
    with pytest.raises(ValueError, match="crane"):
        ev.si_score_label_to_index(["crane"])  # the bird and the machine
    assert ev.si_score_label_to_index(["Granny_Smith"]) == {"Granny_Smith": 948}
    with pytest.raises(ValueError, match="unknown dataset"):
        ev.resolve_path("imagenet-c", data_root)
    with pytest.raises(FileNotFoundError, match="expected a directory"):
        ev.load_eval_set("sketch", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="best.safetensors"):
        ev.find_weights(tmp_path)


def test_segmentation_file_layout_and_count_check(data_root, tmp_path):
    dataset = ev.ImageNetSegmentation(data_root / "gtsegs_ijcv.mat", (32, 32), (0.5,) * 3, (0.5,) * 3)
    image, mask = dataset[1]
    assert len(dataset) == 3 and image.shape == (3, 32, 32) and mask.shape == (32, 32)
    assert mask[:, :16].all() and not mask[:, 16:].any()           # foreground = left half
    assert image[0, :, :16].min() > 0.9 and image[2, :, :16].max() < -0.9  # red on the left
    images, masks = _segmentation_samples(2)
    write_gtsegs(tmp_path / "bad.mat", images, masks[:1])
    with pytest.raises(ValueError, match="2 images and 1 masks"):
        ev.ImageNetSegmentation(tmp_path / "bad.mat", (32, 32), (0.5,) * 3, (0.5,) * 3)


# -- the evaluate command --------------------------------------------------------------------------
def test_evaluate_robustness_command(data_root, weights, tmp_path):
    out = tmp_path / "out"
    assert main(["evaluate", "--model", weights["model"], "--compare", weights["biased"],
                 "--set-a", str(data_root / "set_a.txt"), *_common(data_root, out)]) == 0
    report = json.loads((out / "robustness.json").read_text())
    assert sorted(report["runs"]["before"]) == sorted(ev.ROBUSTNESS_DATASETS)
    after = report["runs"]["after"]
    assert after["imagenet-a"]["standard"]["protocol"] == "standard"
    assert (after["imagenet-a"]["standard"]["top1"], after["imagenet-a"]["paper"]["top1"]) == (50.0, 0.0)
    assert after["imagenet-a"]["paper"]["top5"] == 100.0
    assert (after["objectnet"]["standard"]["top1"], after["objectnet"]["paper"]["top5"]) == (100.0, 0.0)
    assert after["objectnet"]["standard"]["n"] == 2
    imagenet = after["imagenet"]["paper"]
    assert imagenet["top1"] == 50.0 and imagenet["per_class"][VAL_WNIDS[0]]["top1"] == 100.0
    assert (imagenet["set_a"]["top1"], imagenet["set_b"]["top1"], imagenet["set_b"]["n"]) == (100.0, 0.0, 2)
    assert after["imagenet-v2"]["standard"]["top5"] == pytest.approx(200 / 3)
    assert after["imagenet-r"]["paper"]["set_a"] == {"n": 0, "top1": None, "top5": None}  # no set-A images
    markdown = (out / "robustness.md").read_text()
    assert "| Run | INet val R@1 | INet val R@5 | INet-A R@1" in markdown and "set B classes" in markdown
    assert markdown.count("| after |") == 6  # 2 protocols x (all, set A, set B), with deltas


def test_evaluate_segmentation_and_perturbation_commands(data_root, weights, tmp_path):
    assert main(["evaluate", "--model", weights["model"], "--suite", "segmentation",
                 *_common(data_root, tmp_path)]) == 0
    result = json.loads((tmp_path / "segmentation.json").read_text())["runs"]["before"]["segmentation"]
    assert result["images"] == 3 and 0 <= result["miou"] <= 100 and 0 <= result["map"] <= 100
    assert result["protocol"] == "standard"
    assert "| Pixel acc. |" in (tmp_path / "segmentation.md").read_text()
    assert main(["evaluate", "--model", weights["model"], "--suite", "segmentation", "--protocol", "paper",
                 *_common(data_root, tmp_path)]) == 0
    result = json.loads((tmp_path / "segmentation.json").read_text())["runs"]["before"]["segmentation"]
    assert (result["protocol"], result["mean"], result["std"]) == ("paper", [0.5] * 3, [0.5] * 3)
    markdown = (tmp_path / "segmentation.md").read_text()
    assert "Preprocessing: `paper`" in markdown and "| Pointing game |" in markdown
    assert main(["evaluate", "--model", weights["model"], "--checkpoint", weights["biased"],
                 "--suite", "perturbation", "--fractions", "0.2", "0.6", *_common(data_root, tmp_path)]) == 0
    result = json.loads((tmp_path / "perturbation.json").read_text())["runs"]["before"]["imagenet"]
    # the biased model always predicts class 0: half the images, whatever is removed
    assert result["positive"]["accuracy"] == [50.0, 50.0] and result["negative"]["auc"] == pytest.approx(20.0)
    assert "positive AUC" in (tmp_path / "perturbation.md").read_text()


@pytest.mark.parametrize("protocol, peak", [("standard", (1 - 0.485) / 0.229), ("paper", 1.0)])
def test_segmentation_protocol_sets_the_normalisation(protocol, peak, data_root):
    model = tiny_model("vit_cls", num_classes=1000)
    inputs = []
    model.register_forward_pre_hook(lambda module, args: inputs.append(float(args[0][:, 0].max())))
    config = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    result = ev.evaluate_segmentation(model, data_root / "gtsegs_ijcv.mat", batch_size=4, num_workers=0,
                                      data_config=config, progress=False, protocol=protocol)
    assert inputs and all(v == pytest.approx(peak, rel=1e-5) for v in inputs)  # the red channel at 255
    assert result["protocol"] == protocol and result["mean"][1] == (0.5 if protocol == "paper" else 0.456)
    assert {"mass_accuracy", "rank_accuracy", "pointing_game"} <= set(result)


# -- shortcut evaluations ------------------------------------------------------------------------------
def test_in9_superclasses_match_the_authors_table():
    table = ev.in9_superclasses()
    counts = torch.bincount(table[table >= 0], minlength=9).tolist()
    assert counts == [116, 52, 42, 36, 35, 27, 26, 20, 16] and int((table < 0).sum()) == 630
    assert (table[0], table[151], table[171], table[407], table[401], table[999]) == (8, 0, -1, 2, 6, -1)


def test_load_imagenet9_reads_the_release_layout(data_root, tmp_path):
    sets = ev.load_imagenet9(data_root / "bg_challenge")
    assert list(sets) == ["original", "mixed_same", "mixed_rand"]  # fg_mask/ is not a variant
    assert sets["original"].targets == [(i,) for i in range(9)] and sets["original"].classes[2] == "02_wheeled vehicle"
    with pytest.raises(FileNotFoundError, match="no variant folder"):
        ev.load_imagenet9(tmp_path)
    (tmp_path / "original/val/dog").mkdir(parents=True)
    with pytest.raises(ValueError, match="9 class folders"):
        ev.load_imagenet9(tmp_path)


def test_imagenet9_maps_predictions_to_superclasses(data_root):
    # bright images -> 'Chihuahua' (151, superclass dog); dark ones -> 'toilet tissue' (999, no superclass)
    model = RuleModel(lambda x: torch.where(x.mean(dim=(1, 2, 3)) > 0, 151, 999))
    config = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    result = ev.evaluate_imagenet9(model, data_root / "bg_challenge", num_workers=0, data_config=config,
                                   progress=False)
    assert result["mixed_same"] == {"top1": pytest.approx(100 / 9), "n": 9}   # only the dog folder
    assert result["mixed_rand"]["top1"] == 0.0                                # 999 maps to no class
    assert result["bg_gap"] == pytest.approx(100 / 9)                         # mixed_same - mixed_rand


def test_imagenet_w_gap_and_carton_gap_hand_computed(tmp_path):
    pytest.importorskip("imagenet_w")
    carton, tench = ev.imagenet_synsets()[ev.CARTON_CLASS], ev.imagenet_synsets()[0]
    for wnid in (carton, tench):
        folder = tmp_path / "val" / wnid
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    # black images are -1 after normalisation; the white 50% watermark lifts some pixels to ~0
    model = RuleModel(lambda x: torch.where(x.amax(dim=(1, 2, 3)) > -0.5, ev.CARTON_CLASS, 0))
    config = {"input_size": (3, 64, 64), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 1.0, "crop_mode": "center"}
    result = ev.evaluate_imagenet_w(model, ev.load_wnid_folders(tmp_path / "val", "imagenet-w"), num_workers=0,
                                    data_config=config, progress=False)
    # clean: every image -> tench (2 of 4 right, no carton); watermarked: every image -> carton
    assert (result["clean_top1"], result["watermarked_top1"], result["in_w_gap"]) == (50.0, 50.0, 0.0)
    assert (result["clean_carton_top1"], result["watermarked_carton_top1"], result["carton_gap"]) == (0.0, 100.0, 100.0)
    assert result["delta_p_carton"] > 0 and (result["images"], result["carton_images"]) == (4, 2)


def test_evaluate_shortcuts_command(data_root, weights, tmp_path):
    pytest.importorskip("imagenet_w")
    assert main(["evaluate", "--model", weights["model"], "--compare", weights["biased"], "--suite", "shortcuts",
                 *_common(data_root, tmp_path)]) == 0
    after = json.loads((tmp_path / "shortcuts.json").read_text())["runs"]["after"]
    # the biased model always predicts class 0 (tench, superclass fish): one IN-9 folder in nine
    assert after["imagenet-9"]["original"]["top1"] == pytest.approx(100 / 9) and after["imagenet-9"]["bg_gap"] == 0
    assert (after["imagenet-w"]["clean_top1"], after["imagenet-w"]["in_w_gap"]) == (50.0, 0.0)
    assert after["imagenet-w"]["carton_gap"] is None  # no carton images in the fixture
    markdown = (tmp_path / "shortcuts.md").read_text()
    assert "| IN-W gap |" in markdown and "| BG-gap | " in markdown and "| Carton gap |" in markdown


def test_evaluate_command_rejects_bad_dataset_dir(weights, tmp_path, capsys):
    assert "NAME=PATH" in cli_error(
        capsys, ["evaluate", "--model", weights["model"], "--dataset-dir", "nowhere", "--out", str(tmp_path)])


def test_probes_reexport_is_lazy():
    with pytest.raises(AttributeError):
        ev.no_such_probe  # noqa: B018


# -- the table scripts -----------------------------------------------------------------------------
def _run_example(name: str, argv: list[str]) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.main(argv) == 0
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.mark.parametrize("script, only, expected", [
    ("table1_robustness", "ViT-B", "| ViT-B | GradMask | ✓ | - |"),
    ("table2_si_score", "ViT-B", "(+"),
    ("table3_segmentation", "ViT-B", "| Model | ViT-B Orig | ViT-B Ours |"),
    ("table4_ablations", "DeiT-B", "| DeiT-B | w/ ground-truth | - |"),
    pytest.param("shortcut_table", "ViT-B", "| ViT-B Orig | ViT-B Ours | ViT-B Ours (TokenCut) |",
                 marks=pytest.mark.skipif(importlib.util.find_spec("imagenet_w") is None,
                                          reason="needs the imagenet-w package (the eval extra)")),
])
def test_table_scripts(script, only, expected, data_root, weights, tmp_path):
    out = tmp_path / f"{script}.md"
    _run_example(script, ["--only", only, "--model-name", f"{only}={weights['model']}",
                          "--checkpoints", weights["checkpoints"], "--protocol", "paper",
                          *_common(data_root, out)])
    markdown = out.read_text()
    assert expected in markdown
    rows = json.loads(out.with_suffix(".json").read_text())
    evaluated = [row for row in rows if row["results"] is not None]
    assert len(evaluated) == 2  # the original and the one finetune present in the fixture
