"""ImageNet-style folders and the Inception preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from sact.data import ImageNetFolder, central_crop_box, imagenet_eval_transform, imagenet_train_transform


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, wnid in enumerate(("n01440764", "n01443537")):
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            for j in range(2):
                pixels = rng.integers(0, 256, (40 + 10 * j, 60, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{j}.JPEG", quality=90)
    return tmp_path


def test_central_crop_math():
    assert central_crop_box(100, 64, 0.875) == (6, 4, 88, 56)  # int(12.5 / 2) = 6, 100 - 12 = 88
    assert central_crop_box(375, 500, 0.875) == (23, 31, 329, 438)
    assert central_crop_box(7, 9, 1.0) == (0, 0, 7, 9)
    with pytest.raises(ValueError, match="1.5"):
        central_crop_box(10, 10, 1.5)


def test_folders_and_default_transforms(root):
    torch.set_num_threads(1)
    train = ImageNetFolder(root, split="train")
    val = ImageNetFolder(root, split="val", label_offset=1)
    assert len(train) == 4 and train.classes == ["n01440764", "n01443537"]
    for ds, labels in ((train, [0, 0, 1, 1]), (val, [1, 1, 2, 2])):
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.shape == (3, 224, 224) and image.dtype == torch.float32
            assert image.min() >= -1 and image.max() <= 1 and image.min() < 0 < image.max()
            assert label == labels[i]
    small = ImageNetFolder(root, split="val", image_size=32)
    assert small[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="test"):
        ImageNetFolder(root, split="test")
    with pytest.raises(ValueError, match="-1"):
        ImageNetFolder(root, split="val", label_offset=-1)
    with pytest.raises(FileNotFoundError, match="train"):
        ImageNetFolder(root / "missing", split="train")


def test_eval_crop_is_exact():
    # White border of exactly the cropped width (160 // 16 = 10 px): nothing of it survives.
    pixels = np.full((160, 160, 3), 255, np.uint8)
    pixels[10:-10, 10:-10] = 0
    out = imagenet_eval_transform(224)(Image.fromarray(pixels))
    assert out.shape == (3, 224, 224) and torch.all(out == -1)
    pixels2 = np.full((160, 160, 3), 255, np.uint8)  # 11 px border: its inner pixel stays
    pixels2[11:-11, 11:-11] = 0
    out2 = imagenet_eval_transform(224)(Image.fromarray(pixels2))
    assert out2[:, 0].min() > 0.9 and out2[:, 112, 112].max() == -1


def test_train_transform_randomness(root):
    transform = imagenet_train_transform(64)
    image = Image.open(next((root / "train" / "n01440764").iterdir())).convert("RGB")
    torch.manual_seed(0)
    a, b = transform(image), transform(image)
    assert a.shape == b.shape == (3, 64, 64) and not torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
