"""load_image_folder: files on disk equal the same images as tensors, through fu.unlearn too;
every bad input is reported before work starts and writes nothing."""

import csv
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import fastunlearn as fu
from fastunlearn.data import forget
from fastunlearn.data.image_folder import decode, load_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
DEVICES = ("Topcon", "Zeiss", "Canon")


def small_model(channels=3, classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def write_folder(root, x, y, suffix=".png", extra=True):
    """x (N, C, H, W) uint8 as image files under root/img, and labels.csv with metadata."""
    os.makedirs(root / "img", exist_ok=True)
    rows = []
    for i in range(x.shape[0]):
        a = x[i].numpy()
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
        rel = f"img/{i:04d}{suffix}"
        Image.fromarray(a).save(root / rel)
        row = {"path": rel, "label": int(y[i])}
        if extra:
            row.update(device=DEVICES[i % 3], thickness=f"{200 + 7 * i % 90:.1f}")
        rows.append(row)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def images(gen, n=24, c=3, h=10, w=12, classes=4):
    return (torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.uint8),
            torch.randint(0, classes, (n,), generator=gen))


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------ reading
@pytest.mark.parametrize("c", [1, 3])
def test_folder_items_equal_the_images(gen, tmp_path, c):
    x, y = images(gen, c=c)
    rows = write_folder(tmp_path, x, y)
    ds = load_image_folder(tmp_path)
    assert len(ds) == len(y) and ds.skipped == []
    for i in range(len(y)):
        img, label = ds[i]
        assert img.dtype == torch.uint8 and torch.equal(img, x[i])
        assert label.dtype == torch.int64 and int(label) == int(y[i])
    assert torch.equal(ds.targets, y)
    assert ds.metadata[5]["device"] == rows[5]["device"]


def test_jpeg_and_bmp_and_tiff_decode_like_pillow(gen, tmp_path):
    x, y = images(gen, n=3)
    for suffix in (".jpg", ".bmp", ".tiff"):
        d = tmp_path / suffix[1:]
        write_folder(d, x, y, suffix=suffix)
        ds = load_image_folder(d)
        for i in range(3):
            want = np.asarray(Image.open(d / f"img/{i:04d}{suffix}").convert("RGB")).transpose(2, 0, 1)
            assert torch.equal(ds[i][0], torch.from_numpy(np.ascontiguousarray(want)))


def test_sixteen_bit_png_scales_to_uint8(tmp_path):
    a = np.array([[0, 257, 65535], [32767, 32768, 1000]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    got = decode(tmp_path / "a.png")
    want = np.rint(a.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert got.shape == (1, 2, 3) and torch.equal(got[0], torch.from_numpy(want))


def test_class_folders_without_manifest(gen, tmp_path):
    x, _ = images(gen, n=6)
    for i, name in enumerate(["cat", "ant", "bee", "ant", "cat", "cat"]):
        os.makedirs(tmp_path / name, exist_ok=True)
        Image.fromarray(x[i].numpy().transpose(1, 2, 0)).save(tmp_path / name / f"{i}.png")
    ds = load_image_folder(tmp_path)
    assert ds.classes == ["ant", "bee", "cat"]
    assert ds.targets.tolist() == [0, 0, 1, 2, 2, 2]
    assert torch.equal(ds[2][0], x[2])  # bee/2.png
    assert forget.by_metadata(ds, "class == bee").tolist() == [2]


def test_text_labels_map_to_sorted_classes(gen, tmp_path):
    x, y = images(gen, n=4)
    write_folder(tmp_path, x, y)
    rows = list(csv.DictReader(open(tmp_path / "labels.csv")))
    for r, name in zip(rows, ["normal", "severe", "mild", "normal"], strict=True):
        r["label"] = name
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ds = load_image_folder(tmp_path)
    assert ds.classes == ["mild", "normal", "severe"] and ds.targets.tolist() == [1, 2, 0, 1]


def test_resize_and_centre_crop(gen, tmp_path):
    os.makedirs(tmp_path / "img")
    sizes = [(20, 30), (24, 24), (30, 18)]
    arrs = [torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy() for h, w in sizes]
    for i, a in enumerate(arrs):
        Image.fromarray(a).save(tmp_path / f"img/{i}.png")
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"img/{i}.png,{i}\n" for i in range(3)))
    ds = load_image_folder(tmp_path, size=16, crop=12)
    for i, a in enumerate(arrs):
        h, w = a.shape[:2]
        rh, rw = (16, round(w * 16 / h)) if h <= w else (round(h * 16 / w), 16)
        r = np.asarray(Image.fromarray(a).resize((rw, rh), Image.BILINEAR))
        top, left = (rh - 12) // 2, (rw - 12) // 2
        want = r[top:top + 12, left:left + 12].transpose(2, 0, 1)
        assert torch.equal(ds[i][0], torch.from_numpy(np.ascontiguousarray(want)))
    assert load_image_folder(tmp_path, size=(9, 7))[1][0].shape == (3, 9, 7)


def test_dicom(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    a = np.array([[0, 4095, 2048], [100, 200, 300]], dtype=np.uint16)
    for name, photometric in (("a.dcm", "MONOCHROME2"), ("b.dcm", "MONOCHROME1")):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(tmp_path / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Rows, ds.Columns, ds.SamplesPerPixel = 2, 3, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PhotometricInterpretation = photometric
        ds.PixelData = a.tobytes()
        ds.save_as(str(tmp_path / name), enforce_file_format=True)
    (tmp_path / "labels.csv").write_text("path,label\na.dcm,0\nb.dcm,1\n")
    got = load_image_folder(tmp_path)
    want = np.rint(a.astype(np.float64) * 255 / 4095).astype(np.uint8)
    assert torch.equal(got[0][0][0], torch.from_numpy(want))
    assert torch.equal(got[1][0][0], torch.from_numpy(255 - want))
    assert pydicom.__name__ == "pydicom"


def test_dicom_without_pydicom_names_the_package(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pydicom(name, *a, **kw):
        if name == "pydicom" or name.startswith("pydicom."):
            raise ImportError("no pydicom")
        return real(name, *a, **kw)

    (tmp_path / "a.dcm").write_bytes(b"\0" * 200)
    (tmp_path / "labels.csv").write_text("path,label\na.dcm,0\n")
    monkeypatch.setattr(builtins, "__import__", no_pydicom)
    with pytest.raises(ImportError, match="pip install pydicom"):
        load_image_folder(tmp_path)


# --------------------------------------------------- equality through unlearn
CONFIGS = [fu.UnlearnConfig(epochs=2, batch_size=8, lr=0.05, loader_workers=0),
           fu.UnlearnConfig(epochs=2, batch_size=8, lr=0.05, steps=2, gamma=0.05, remain_reg=0.5, loader_workers=2,
                            augment="crop+flip")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["serial", "workers-noisy-remain"])
def test_unlearn_from_a_folder_equals_tensors(gen, tmp_path, cfg):
    """Same seed, same images: the folder gives bitwise the tensors' result, with the
    forget set chosen by a metadata rule on the same CSV."""
    x, y = images(gen, n=40)
    write_folder(tmp_path, x, y)
    ds = load_image_folder(tmp_path)
    rule = ["device != Canon", "thickness >= 230"]
    idx = forget.by_metadata(ds, rule)
    assert torch.equal(idx, forget.by_metadata(tmp_path / "labels.csv", rule, n=len(ds)))
    keep = torch.tensor([i for i in range(len(ds)) if i not in set(idx.tolist())])
    (fx, fy), (rx, ry) = forget.split(x, y, idx)
    a = fu.unlearn(small_model(), (fx, fy), (rx, ry), config=cfg, mean=MEAN, std=STD, progress=False)
    sub_f, sub_r = torch.utils.data.Subset(ds, idx.tolist()), torch.utils.data.Subset(ds, keep.tolist())
    b = fu.unlearn(small_model(), sub_f, sub_r, config=cfg, mean=MEAN, std=STD, progress=False)
    assert torch.equal(a.relabels, b.relabels)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    for (name, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb), name


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["missing", "unreadable", "truncated", "sizes", "column", "channels", "crop"])
def test_bad_input_is_reported_before_work_and_writes_nothing(gen, tmp_path, case):
    x, y = images(gen, n=6)
    write_folder(tmp_path, x, y)
    kw = {}
    if case == "missing":
        (tmp_path / "img/0003.png").unlink()
        match = r"0003\.png \(manifest row 4\): missing"
    elif case == "unreadable":
        (tmp_path / "img/0002.png").write_bytes(b"not an image at all")
        match = r"0002\.png \(manifest row 3\): unreadable"
    elif case == "truncated":
        raw = (tmp_path / "img/0004.png").read_bytes()
        (tmp_path / "img/0004.png").write_bytes(raw[:-20])
        match = r"0004\.png \(manifest row 5\): unreadable"
    elif case == "sizes":
        Image.fromarray(np.zeros((7, 5, 3), np.uint8)).save(tmp_path / "img/0001.png")
        match = r"different sizes.*\(10, 12\).*\(7, 5\).*size="
    elif case == "column":
        kw = {"label_column": "grade"}
        match = r"no column 'grade'; the columns are \['path', 'label', 'device', 'thickness'\]"
    elif case == "channels":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "img/0001.png")
        match = r"mix grey and colour.*channels=1 or channels=3"
    else:
        kw = {"crop": (11, 13)}
        match = r"crop \(11, 13\) is larger than the image \(10, 12\)"
    before = files_under(tmp_path)
    with pytest.raises(ValueError, match=match):
        load_image_folder(tmp_path, **kw)
    assert files_under(tmp_path) == before


def test_skip_unreadable_lists_what_was_left_out(gen, tmp_path):
    x, y = images(gen, n=6)
    write_folder(tmp_path, x, y)
    (tmp_path / "img/0001.png").unlink()
    (tmp_path / "img/0004.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="left out 2"):
        ds = load_image_folder(tmp_path, skip_unreadable=True)
    assert [(os.path.basename(p), row) for p, row, _ in ds.skipped] == [("0001.png", 1), ("0004.png", 4)]
    assert ds.rows == [0, 2, 3, 5] and len(ds) == 4
    assert torch.equal(ds[2][0], x[3]) and ds.metadata[2]["path"] == "img/0003.png"
    # Rules see the dataset's rows, not the CSV's: index 1 is the CSV's row 2.
    assert forget.by_metadata(ds, "path == img/0002.png").tolist() == [1]


def test_named_manifest_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        load_image_folder(tmp_path, manifest="meta.csv")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_image_folder(tmp_path / "nowhere")


def test_evaluate_and_report_from_a_folder_equal_tensors(gen, tmp_path):
    from fastunlearn.eval.report import report

    x, y = images(gen, n=70)
    write_folder(tmp_path / "data", x, y)
    ds = load_image_folder(tmp_path / "data")
    model = small_model().eval()
    idx = forget.by_metadata(ds, "device == Zeiss")
    (fx, fy), (rx, ry) = forget.split(x, y, idx)
    keep = [i for i in range(len(ds)) if i not in set(idx.tolist())]
    sets_t = dict(forget=(fx, fy), remain=(rx, ry), test=(x, y))
    sets_d = dict(forget=torch.utils.data.Subset(ds, idx.tolist()), remain=torch.utils.data.Subset(ds, keep), test=ds)
    kw = dict(mean=MEAN, std=STD, per_class=True)
    assert fu.evaluate(model, **sets_t, **kw) == fu.evaluate(model, **sets_d, **kw)
    a = report({"m": model}, **sets_t, out_dir=str(tmp_path / "a"), retrain=None, mean=MEAN, std=STD, tsne=False)
    b = report({"m": model}, **sets_d, out_dir=str(tmp_path / "b"), retrain=None, mean=MEAN, std=STD, tsne=False)
    assert a.rows == b.rows


def test_labels_of_a_subset_are_read_without_decoding(gen, tmp_path, monkeypatch):
    from fastunlearn.data import image_folder
    from fastunlearn.data.streaming import dataset_labels

    x, y = images(gen, n=12)
    write_folder(tmp_path, x, y)
    ds = load_image_folder(tmp_path)
    monkeypatch.setattr(image_folder, "decode", lambda *a, **k: pytest.fail("an image was decoded"))
    sub = torch.utils.data.Subset(torch.utils.data.Subset(ds, [9, 3, 5, 7]), [3, 0, 1])
    assert dataset_labels(sub, "forget").tolist() == [int(y[7]), int(y[9]), int(y[3])]
    tds = torch.utils.data.TensorDataset(x, y)
    assert torch.equal(dataset_labels(torch.utils.data.Subset(tds, [2, 1]), "forget"), y[[2, 1]])
