"""``sact ponder-map`` on real photos (scikit-image), every Pillow mode, EXIF rotation,
corrupt files, tiny images, unique names, colour ranges and the HTML gallery."""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sact
from sact.cli import main
from sact.tools.gallery import load_image, unique_names
from sact.data import Preprocess

CLASSES = [f"class <{i}> & co" for i in range(10)]  # escaped in the gallery
OUTPUTS = ("_image.png", "_ponder.png", "_overlay.png", "_stages.png", "_ponder.npy")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = sact.create_model("resnet20_cifar", base_channels=4)
    with torch.no_grad():  # spread the halting so the maps vary over the image
        for stage in model.stages:
            for branch in stage.halting:
                branch.local_conv.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("ck") / "tiny"
    pre = Preprocess(kind="standardize", in_chans=3)
    sact.save_checkpoint(model, path, meta={"preprocess": pre.to_dict(), "classes": CLASSES, "tau": 0.01})
    return path


def _run(paths, out, checkpoint, *extra):
    return main(["ponder-map", *map(str, paths), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--device", "cpu", *extra])


def _results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input", "source"}

    def __init__(self):
        super().__init__()
        self.stack, self.refs, self.errors, self.doctype = [], [], [], False

    def handle_decl(self, decl):
        self.doctype |= decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("href", "src")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def _check_gallery(out):
    from urllib.parse import unquote

    checker = _Checker()
    checker.feed((out / "index.html").read_text(encoding="utf-8"))
    checker.close()
    assert checker.doctype and not checker.errors and not checker.stack
    assert checker.refs, "gallery links nothing"
    for ref in checker.refs:
        assert (out / unquote(ref)).is_file(), ref
    return checker


def test_real_photos_match_the_api(tmp_path, checkpoint):
    import skimage.data

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    photos = {"astronaut.jpg": skimage.data.astronaut(), "coffee.png": skimage.data.coffee(),
              "sub/chelsea.jpg": skimage.data.chelsea(), "rocket.png": skimage.data.rocket()}
    for name, array in photos.items():
        Image.fromarray(array).save(folder / name)
    out = tmp_path / "out"
    assert _run([folder], out, checkpoint, "--max-side", "48") == 0
    records = {Path(r["file"]).name: r for r in _results(out)}
    assert sorted(records) == sorted(Path(n).name for n in photos)
    model = sact.load_checkpoint(checkpoint)
    for name in photos:
        rec = records[Path(name).name]
        for suffix in OUTPUTS:
            assert (out / f"{rec['name']}{suffix}").is_file()
        pm = sact.ponder_map(model, load_image(folder / name), max_side=48)
        np.testing.assert_allclose(np.load(out / f"{rec['name']}_ponder.npy"), pm.summed.numpy(), rtol=1e-6)
        assert max(rec["height"], rec["width"]) == 48 and rec["flops"] == pm.flops
        h, w = photos[name].shape[:2]
        assert rec["width"] / rec["height"] == pytest.approx(w / h, rel=0.05)
        assert rec["class_name"] == CLASSES[rec["predicted_class"]] == CLASSES[pm.predicted_class]
        assert rec["ponder_cost"] == pytest.approx(pm.ponder_cost, rel=1e-6)
        # the overlay is drawn like the map: the same figure (colour bar included), the image showing through
        over = np.asarray(Image.open(out / f"{rec['name']}_overlay.png").convert("RGB"))
        ponder = np.asarray(Image.open(out / f"{rec['name']}_ponder.png").convert("RGB"))
        assert over.shape == ponder.shape and over.shape[1] > rec["width"] and not np.array_equal(over, ponder)
        # FLOPs against the vanilla network of the same architecture at this size
        vanilla = sact.create_model("resnet20_cifar", mode="vanilla", base_channels=4).eval()
        base = int(vanilla(torch.zeros(1, 3, rec["height"], rec["width"])).flops[0])
        assert rec["flops_vanilla"] == base and rec["flops_vs_vanilla"] == pytest.approx(pm.flops / base)
    page = (out / "index.html").read_text()
    assert "class &lt;" in page and "class <" not in page
    assert "% of the vanilla network" in page
    _check_gallery(out)


def _mode_images(folder):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 33, 3), dtype=np.uint8))
    grad16 = (np.arange(24 * 33, dtype=np.uint16).reshape(24, 33) * 80).astype(np.uint16)
    images = {
        "grey.png": rgb.convert("L"),
        "rgb.webp": rgb,
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "palette.gif": rgb.convert("P"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "cmyk.tiff": rgb.convert("CMYK"),
        "deep.png": Image.fromarray(grad16),
        "deep.tif": Image.fromarray(grad16),
        "bits.bmp": rgb.convert("1"),
        "rgb.bmp": rgb,
    }
    for name, im in images.items():
        im.save(folder / name)
    return images, grad16


def test_every_pillow_mode(tmp_path, checkpoint):
    folder = tmp_path / "modes"
    folder.mkdir()
    images, grad16 = _mode_images(folder)
    assert Image.open(folder / "deep.png").mode.startswith("I;16")
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK" and Image.open(folder / "bits.bmp").mode == "1"
    out = tmp_path / "out"
    assert _run([folder], out, checkpoint) == 0
    records = {Path(r["file"]).name: r for r in _results(out)}
    assert sorted(records) == sorted(images)
    for r in records.values():
        assert (r["height"], r["width"]) == (24, 33) and np.isfinite(r["ponder_cost"])
    shown = np.asarray(Image.open(out / f"{records['deep.png']['name']}_image.png")).astype(float)
    np.testing.assert_allclose(shown[..., 0], grad16 / 65535 * 255, atol=0.51)  # 16-bit scaled, not clipped
    _check_gallery(out)


def test_exif_orientation_is_respected(tmp_path, checkpoint):
    stored = np.zeros((24, 40, 3), np.uint8)
    stored[:, :8] = (255, 0, 0)  # red band on the left of the stored pixels
    stored[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    out = tmp_path / "out"
    assert _run([tmp_path / "rotated.jpg"], out, checkpoint) == 0
    shown = np.asarray(Image.open(out / "rotated_image.png")).astype(int)
    assert shown.shape == (40, 24, 3)  # displayed portrait
    assert shown[:6, :, 0].mean() > 200 and shown[:6, :, 2].mean() < 60  # left band is now on top
    assert shown[-6:, :, 2].mean() > 200
    assert np.load(out / "rotated_ponder.npy").shape == (40, 24)


def test_corrupt_files_are_skipped_with_reason_and_exit_1(tmp_path, checkpoint, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = np.random.default_rng(2).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(good).save(folder / "a_good.png")
    buf = io.BytesIO()
    Image.fromarray(good).save(buf, format="PNG")
    (folder / "b_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "c_text.jpg").write_text("not an image")
    Image.fromarray(good).save(folder / "d_good.jpg")
    (folder / "notes.txt").write_text("ignored: no image extension")
    out = tmp_path / "out"
    assert _run([folder, tmp_path / "missing.png"], out, checkpoint) == 1
    err = capsys.readouterr().err
    for name in ("b_truncated.png", "c_text.jpg", "missing.png"):
        assert f"skipped {folder / name if name != 'missing.png' else tmp_path / name}:" in err
    assert "cannot decode image" in err and "no such file or folder" in err
    assert sorted(Path(r["file"]).name for r in _results(out)) == ["a_good.png", "d_good.jpg"]
    checker = _check_gallery(out)
    assert not any("truncated" in ref for ref in checker.refs)
    assert "b_truncated.png" in (out / "index.html").read_text()  # listed under Skipped
    assert _run([folder / "a_good.png"], tmp_path / "ok", checkpoint) == 0


def test_image_smaller_than_stride(tmp_path, checkpoint, capsys):
    Image.fromarray(np.full((3, 2, 3), 128, np.uint8)).save(tmp_path / "tiny.png")
    assert _run([tmp_path / "tiny.png"], tmp_path / "up", checkpoint) == 0
    assert "upscaled to 6x4" in capsys.readouterr().err
    assert np.load(tmp_path / "up" / "tiny_ponder.npy").shape == (6, 4)
    assert _results(tmp_path / "up")[0]["upscaled"] is True
    assert _run([tmp_path / "tiny.png"], tmp_path / "strict", checkpoint, "--no-upscale") == 1
    assert "smaller than the network's total stride 4" in capsys.readouterr().err


def test_same_stem_gives_unique_names_and_ranges(tmp_path, checkpoint):
    rng = np.random.default_rng(3)
    for sub, ext in (("a", "jpg"), ("b", "png"), ("c", "png")):
        (tmp_path / sub).mkdir()
        Image.fromarray(rng.integers(0, 256, (16 + 8 * len(sub), 28, 3), dtype=np.uint8)).save(tmp_path / sub / f"x.{ext}")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "c" / "X-2.png")
    inputs = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.png", tmp_path / "c"]
    out = tmp_path / "shared"
    assert _run(inputs, out, checkpoint) == 0
    records = _results(out)
    names = [r["name"] for r in records]
    assert len(records) == 4 and len({n.lower() for n in names}) == 4
    maps = [np.load(out / f"{n}_ponder.npy") for n in names]
    expected = np.percentile(np.concatenate([m.ravel() for m in maps]), [0.1, 99.9])
    for r in records:
        np.testing.assert_allclose(r["color_range"], expected, rtol=1e-9)
    out = tmp_path / "per"
    assert _run(inputs, out, checkpoint, "--range", "per-image") == 0
    for r in _results(out):
        m = np.load(out / f"{r['name']}_ponder.npy")
        assert r["color_range"] == pytest.approx([m.min(), m.max()])


def test_unique_names_case_insensitive_and_safe():
    files = [Path("a/x.jpg"), Path("b/X.png"), Path("c/x-2.png"), Path("d/ä b&c.tif"), Path("e/...png")]
    assert unique_names(files) == ["x", "X-2", "x-2-2", "b_c", "image"]


def test_non_utf8_file_name(tmp_path, checkpoint):
    import os

    name = os.fsdecode(b"caf\xe9 <1>.png")  # Latin-1 byte: not valid UTF-8
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / name)
    out = tmp_path / "out"
    assert _run([tmp_path / name], out, checkpoint) == 0
    assert [r["name"] for r in _results(out)] == ["caf_1"]
    assert "caf\\udce9 &lt;1&gt;.png" in (out / "index.html").read_text(encoding="utf-8")
    _check_gallery(out)


def test_bad_checkpoint_or_device_exit_2(tmp_path, checkpoint, capsys):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    assert _run([tmp_path / "a.png"], tmp_path / "o", tmp_path / "missing") == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert main(["ponder-map", str(tmp_path / "a.png"), "--checkpoint", str(checkpoint), "--out",
                 str(tmp_path / "o"), "--device", "nonsense"]) == 2
