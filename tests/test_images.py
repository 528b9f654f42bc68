"""The image data path: digits, ImageFolder directories and ``datasets`` image datasets, resized and normalised
for the backbone when batched; the tiny timm ViT through the whole pipeline (offline)."""
import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bayestune_pyro import pipeline
from bayestune_pyro.config import RunConfig
from bayestune_pyro.data import ImageInput, load_task, make_loader
from bayestune_pyro.data.images import load_digits
from bayestune_pyro.finetune.delta import merge
from bayestune_pyro.models.backbones import load_backbone
from bayestune_pyro.run_setup import setup
from bayestune_pyro.selection.masks import Mask

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), 51  # a cat is red, a dog blue; a grey (L-mode) dog reads 0.2 everywhere


def batch_of(examples, size, **kw):
    loader = make_loader(examples, None, batch_size=len(examples), max_length=0, shuffle=False,
                         image_input=ImageInput(size, **kw))
    return next(iter(loader))


def save(path, mode, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def folder(tmp_path):
    """train: 2 cats (red, 5×7 and 6×6), 1 dog (blue, 9×4) and a grey dog; test: 1 cat, 1 dog."""
    root = tmp_path / "pets"
    save(root / "train" / "cat" / "a.png", "RGB", (5, 7), RED)
    save(root / "train" / "cat" / "b.jpg", "RGB", (6, 6), RED)
    save(root / "train" / "dog" / "a.png", "RGB", (9, 4), BLUE)
    save(root / "train" / "dog" / "b.png", "L", (3, 3), GREY)
    (root / "train" / "dog" / ".DS_Store").write_bytes(b"\0\1")  # hidden files are not data
    save(root / "test" / "cat" / "c.png", "RGBA", (4, 4), (*RED, 128))
    save(root / "test" / "dog" / "c.png", "RGB", (4, 4), BLUE)
    return root


def one_line_error(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        load_task(*args, **kwargs)
    assert "\n" not in str(info.value)


# --- digits ------------------------------------------------------------------------------------

def test_digits_are_stored_natively_and_batches_give_the_former_32px_values():
    from sklearn.datasets import load_digits as sklearn_digits

    train, test = load_digits(random.Random(0), test_fraction=0.0)  # every digit, in sklearn's order
    assert not test and len(train) == 1797 and train[0].pixels().shape == (3, 8, 8)
    raw = torch.tensor(sklearn_digits().images[:16], dtype=torch.float32)[:, None] / 16.0
    former = ((F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False) - 0.5) / 0.5).expand(-1, 3, -1,
                                                                                                               -1)
    batch = batch_of(train[:16], (32, 32))
    assert torch.allclose(batch["pixel_values"], former, rtol=0, atol=1e-6)
    assert batch["labels"].tolist() == sklearn_digits().target[:16].tolist()
    assert batch_of(train[:4], (24, 40))["pixel_values"].shape == (4, 3, 24, 40)


def test_image_examples_need_an_image_input():
    with pytest.raises(ValueError, match=r"^image_input: not given, but the examples are images; .*tiny-vit"):
        make_loader(load_task("digits").train, None, batch_size=4, max_length=0, shuffle=False)


# --- backbones ---------------------------------------------------------------------------------

def test_tiny_vit_takes_digits_at_the_size_it_was_built_for(one_thread):
    backbone = load_backbone("tiny-vit", 10)
    assert backbone.model.pretrained_cfg["input_size"] == (3, 224, 224)  # timm's config keeps the architecture's
    assert backbone.image_input.size == (32, 32) and backbone.head_names == ["head.weight", "head.bias"]
    assert backbone.image_input.mean == backbone.image_input.std == (0.5, 0.5, 0.5)
    assert sum(p.numel() for p in backbone.model.parameters()) < 50_000
    data = load_task("digits", seed=0)
    loader = make_loader(data.train, None, batch_size=8, max_length=0, shuffle=True, image_input=backbone.image_input)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    args, kwargs = backbone.inputs(batch)
    with torch.no_grad():
        assert backbone.logits(backbone.model(*args, **kwargs)).shape == (8, 10)
        with pytest.raises(AssertionError, match="doesn't match model"):  # what a fixed 32×32 loader used to hit
            backbone.model(F.interpolate(batch["pixel_values"], size=(48, 48)))
    again = load_backbone("tiny-vit", 10)
    assert all(torch.equal(a, b) for a, b in zip(backbone.model.state_dict().values(),
                                                 again.model.state_dict().values()))


def test_a_cnn_takes_its_pretrained_input_size_and_normalisation():
    backbone = load_backbone("timm:test_efficientnet", 3, pretrained=False)
    assert backbone.image_input == ImageInput((160, 160), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# --- ImageFolder directories -------------------------------------------------------------------

def test_image_folder_classes_labels_and_pixels(folder):
    data = load_task("image-folder", folder)
    assert data.spec.name == "image-folder" and data.spec.num_labels == 2 and not data.spec.is_regression
    assert data.spec.label_names == ("cat", "dog")
    assert [e.label for e in data.train] == [0, 0, 1, 1] and [e.label for e in data.test] == [0, 1]
    assert [tuple(e.pixels().shape) for e in data.train] == [(3, 7, 5), (3, 6, 6), (3, 4, 9), (3, 3, 3)]
    grey = data.train[3].pixels()
    assert torch.allclose(grey, torch.full((3, 3, 3), GREY / 255))
    batch = batch_of(data.train, (16, 12))
    pixels = batch["pixel_values"]
    assert pixels.shape == (4, 3, 16, 12) and batch["labels"].tolist() == [0, 0, 1, 1]
    assert torch.allclose(pixels[2], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 16, 12))  # blue
    assert torch.allclose(pixels[0, 0], torch.ones(16, 12)) and torch.allclose(pixels[0, 1:], -torch.ones(2, 16, 12))
    assert pixels[1, 0].min() > 0.95 and pixels[1, 1:].max() < -0.95  # the JPEG cat is red too, near enough
    test = batch_of(data.test, (4, 4), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))["pixel_values"]
    assert torch.allclose(test[0], torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 4, 4))  # RGBA → RGB


def test_val_is_a_test_folder_and_validation_comes_from_train(folder):
    (folder / "test").rename(folder / "val")
    data = load_task("image-folder", str(folder), validation_fraction=0.5, seed=3)
    assert [e.label for e in data.test] == [0, 1] and len(data.validation) == len(data.train) == 2
    assert {id(e) for e in data.validation}.isdisjoint(id(e) for e in data.train)


@pytest.mark.parametrize("change, match", [
    (lambda root: (root / "train").rename(root / "training"), r"^data_dir: '.*pets' has no train/ folder \(expected "),
    (lambda root: (root / "test").rename(root / "testing"), r"^data_dir: '.*pets' has no test/ or val/ folder"),
    (lambda root: save(root / "test" / "bird" / "a.png", "RGB", (2, 2), RED),
     r"^data_dir: '.*pets/test' has classes bird, cat, dog, but '.*pets/train' has cat, dog; the class folders must"),
    (lambda root: (root / "train" / "fish").mkdir(), r"^data_dir: class folder '.*pets/train/fish' holds no images$"),
    (lambda root: (root / "train" / "cat" / "notes.txt").write_text("cats"),
     r"^data_dir: '.*train/cat/notes.txt' is not an image file \(allowed: .jpg, .jpeg, .png,"),
    (lambda root: (root / "test" / "dog" / "broken.png").write_bytes(b"not a png"),
     r"^data_dir: '.*test/dog/broken.png' is not a readable image \(PIL cannot identify it\)$"),
    (lambda root: [shutil.rmtree(root / split / "dog") for split in ("train", "test")],
     r"^data_dir: '.*pets/train' has classes \[cat\]; a classifier needs at least 2$"),
], ids=["no-train", "no-test", "mismatched-classes", "empty-class", "non-image-file", "broken-image", "one-class"])
def test_bad_image_folders_are_one_line_errors(folder, change, match):
    change(folder)
    one_line_error(match, "image-folder", folder)


def test_image_folder_needs_an_existing_data_dir(tmp_path):
    one_line_error(r"^data_dir: not given; task 'image-folder' reads its images from --data-dir$", "image-folder")
    one_line_error(r"^data_dir: '.*nowhere' does not exist$", "image-folder", tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"^data_dir: '.*nowhere' is not a directory$"):
        RunConfig(task="image-folder", data_dir=str(tmp_path / "nowhere"))


# --- datasets image datasets -------------------------------------------------------------------

def image_dict(splits, image="image", label="label", names=("cat", "dog"), features=None):
    """A DatasetDict of 2×3 images per split (the class id in the red channel), as ``save_to_disk`` writes it."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    features = features or Features({image: ImageFeature(), label: ClassLabel(names=list(names))})
    return DatasetDict({split: Dataset.from_dict(
        {image: [Image.new("RGB", (2, 3), (100 * y, 7, 9)) for y in labels], label: labels}, features=features)
        for split, labels in splits.items()})


def test_hf_images_from_a_saved_dataset(tmp_path):
    image_dict({"train": [1, 0, 1, 1], "test": [0, 1]}).save_to_disk(tmp_path / "ds")
    data = load_task("hf-images", tmp_path / "ds")
    assert data.spec.num_labels == 2 and data.spec.label_names == ("cat", "dog")
    assert [e.label for e in data.train] == [1, 0, 1, 1] and [e.label for e in data.test] == [0, 1]
    assert data.train[0].pixels().shape == (3, 3, 2)
    pixels = batch_of(data.train, (5, 5), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))["pixel_values"]
    assert pixels.shape == (4, 3, 5, 5)
    assert torch.allclose(pixels[:, 0, 0, 0], torch.tensor([100.0, 0.0, 100.0, 100.0]) / 255)  # the class id
    assert torch.allclose(pixels[:, 1:, 2, 3], torch.tensor([7.0, 9.0]) / 255)


def test_hf_images_accept_img_labels_and_a_validation_split(tmp_path):
    image_dict({"train": [2, 0, 1], "validation": [1]}, image="img", label="labels",
               names=("a", "b", "c")).save_to_disk(tmp_path / "ds")
    data = load_task("hf-images", str(tmp_path / "ds"))
    assert data.spec.label_names == ("a", "b", "c") and [e.label for e in data.test] == [1]
    assert torch.allclose(data.train[0].pixels()[0], torch.full((3, 2), 200 / 255))


@pytest.mark.parametrize("splits, kw, match", [
    ({"train": [0, 1]}, {}, r"^data_dir: '.*ds' has splits train; expected train and test \(or validation\)"),
    ({"train": [0, 1], "test": [1]}, dict(image="picture"),
     r"^data_dir: '.*ds' split 'train' has no image column \(expected 'image' or 'img' of type datasets.Image; "
     r"found: picture \(Image\), label \(ClassLabel\)\)$"),
    ({"train": [0, 1], "test": [1]}, dict(label="target"), r"^data_dir: '.*ds' split 'train' has no class column"),
    ({"train": [0, 1], "test": [-1]}, {}, r"^data_dir: '.*ds' split 'test' has label -1 \(expected class ids 0 to 1;"),
    ({"train": [0, 0], "test": [0]}, dict(names=("cat",)), r"^data_dir: '.*ds' has classes \[cat\]; a classifier"),
], ids=["no-test-split", "no-image-column", "no-class-column", "unlabelled", "one-class"])
def test_bad_image_datasets_are_one_line_errors(tmp_path, splits, kw, match):
    image_dict(splits, **kw).save_to_disk(tmp_path / "ds")
    one_line_error(match, "hf-images", tmp_path / "ds")


def test_image_column_must_hold_images(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"image": Value("string"), "label": ClassLabel(names=["cat", "dog"])})
    DatasetDict({s: Dataset.from_dict({"image": ["a.png"], "label": [0]}, features=features)
                 for s in ("train", "test")}).save_to_disk(tmp_path / "ds")
    one_line_error(r"^data_dir: .* has no image column .* found: image \(Value\), label \(ClassLabel\)\)$",
                   "hf-images", tmp_path / "ds")


def test_a_hub_id_offline_and_a_plain_folder_are_one_line_errors(tmp_path, monkeypatch):
    import datasets

    def offline(*args):
        raise ConnectionError("no network\nat all")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = RunConfig(task="hf-images", data_dir="someone/pets")  # a hub id is no directory, and that is fine
    one_line_error(r"^data_dir: 'someone/pets' is not a directory and the Hugging Face hub is unreachable for "
                   r"someone/pets \(HF_HUB_OFFLINE set\); pass a datasets directory written by save_to_disk$",
                   config.task, config.data_dir)
    one_line_error(r"^data_dir: '.*' is not a datasets directory \(none written by save_to_disk\)$", "hf-images",
                   tmp_path)
    one_line_error(r"^data_dir: not given; task 'hf-images' reads a datasets directory", "hf-images")


# --- the whole pipeline ------------------------------------------------------------------------

@pytest.mark.parametrize("task, backbone, match", [
    ("digits", "tiny-bert", r"^backbone: 'tiny-bert' takes text input, but task 'digits' has image examples; use "
                            r"tiny-vit or timm:<name>$"),
    ("bbc-news", "tiny-vit", r"^backbone: 'tiny-vit' takes image input, but task 'bbc-news' has text examples; use "
                             r"minilm-l6, tiny-bert or hf:<hub id or dir>$"),
])
def test_a_backbone_for_other_examples_is_a_one_line_error(task, backbone, match):
    with pytest.raises(ValueError, match=match):
        setup(RunConfig(task=task, backbone=backbone))


TINY_VIT = dict(task="digits", backbone="tiny-vit", train_size=256, steps=8, warmup=2, burnin=2, thin=2,
                stage2_steps=4, batch_size=16, n_tracked=16, p=0.02)


@pytest.mark.parametrize("space", [{}, {"search_space": "additive", "p": 0.05}], ids=["subset", "additive"])
def test_tiny_vit_runs_the_pipeline_on_digits(tmp_path, space, one_thread):
    config = RunConfig.from_dict({**TINY_VIT, **space})
    metrics = pipeline.run(config, tmp_path, progress=False)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    mask = Mask.load(tmp_path)
    assert metrics["task"] == "digits" and metrics["n_updated"] == math.floor(config.p * mask.layout.d) > 0
    modules = {name.rsplit(".", 1)[0] for name in mask.layout.names}
    if space:  # LoRA on qkv, adapters after attn.proj and mlp.fc2, gated prompts in attn, in both blocks
        assert modules == {f"blocks.{b}.{m}" for b in (0, 1) for m in ("attn.qkv", "attn.proj", "mlp.fc2", "attn")}
    else:
        assert {"patch_embed.proj", "blocks.1.mlp.fc2", "norm"} <= modules and "head" not in modules
    merged, s = merge(tmp_path / "delta.safetensors"), setup(config)  # the delta on a fresh tiny-vit
    merged.model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in s.test_loader():
            correct += (merged.model(batch["pixel_values"]).argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
    assert total == 359 and correct / total == pytest.approx(metrics["test_accuracy"], abs=1e-9)


def test_image_size_overrides_a_cnn_size_and_refuses_another_vit_size():
    s = setup(RunConfig(task="digits", backbone="timm:test_efficientnet", pretrained=False, image_size=40))
    assert next(s.train_batches())["pixel_values"].shape[-2:] == (40, 40)  # 160 without it
    with pytest.raises(ValueError, match=r"^image_size: 48 does not fit backbone 'tiny-vit', which takes only 32×32"):
        setup(RunConfig(task="digits", backbone="tiny-vit", image_size=48))
    with pytest.raises(ValueError, match="image_size: must be >= 1"):
        RunConfig(image_size=0)
