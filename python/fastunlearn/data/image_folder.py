"""Image files on disk as a Dataset: a folder with a CSV manifest, or one folder per class.

``load_image_folder`` checks every file's header (not its pixels) before returning, so a
missing file, an unreadable one, mixed sizes or a manifest without the named columns is
reported before any unlearning starts. Pixels are decoded only when an item is read, so a
set larger than memory can be streamed (fu.unlearn reads a Dataset in chunks).

Pixel convention (the package's): each item is (uint8 (C, H, W), int64 label).

* PNG / JPEG / BMP / TIFF are decoded with Pillow (a dependency already; torchvision.io
  would add torchvision, whose PyPI wheels for this torch link CUDA libraries and do not
  load with the CPU build).
* 16-bit images (PNG "I;16", TIFF) are scaled to uint8 as round(v * 255 / 65535): the full
  16-bit range maps onto [0, 255], as the engine's uint8 -> [0, 1] conversion expects.
* DICOM (``.dcm``/``.dicom``) is read with pydicom (an optional dependency). The stored
  value range (BitsStored) is scaled to [0, 255] the same way; MONOCHROME1 is inverted
  so that bright means dense in every image.
* Grey images give C = 1, colour C = 3; palette, bilevel and alpha images are converted
  (alpha dropped). ``channels`` forces 1 or 3 for sets that mix the two.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.utils.data
from tqdm.auto import tqdm

from fastunlearn.data.forget import read_table

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_GREY_MODES = ("L", "1", "LA") + _SIXTEEN_BIT_MODES
_COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images read from files on demand: item i is (uint8 (C, H, W) tensor, int64 label).

    paths / labels: one per item. metadata: one dict per item (the manifest's columns as
    text), for forget.by_metadata. targets: all labels as an int64 tensor, known without
    decoding. skipped: (path, CSV row or None, reason) of each file left out. rows: the
    manifest's data row (0-based) of each item, None without a manifest.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], metadata: list, *, size, crop, channels: int,
                 skipped: list, rows: Optional[list] = None, classes: Optional[list] = None):
        self.paths = list(paths)
        self.targets = torch.tensor(list(labels), dtype=torch.int64)
        self.metadata = metadata
        self.size, self.crop, self.channels = size, crop, channels
        self.skipped = skipped
        self.rows = rows
        self.classes = classes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, torch.Tensor):
            i = int(i)
        img = decode(self.paths[i], channels=self.channels, size=self.size, crop=self.crop)
        return img, self.targets[i]


# ------------------------------------------------------------------ decoding
def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ImportError("reading DICOM files needs the pydicom package, which is not installed: "
                          "pip install pydicom") from None
    return pydicom


def _scale16(a: np.ndarray, top: int) -> np.ndarray:
    """Integer pixels in [0, top] as uint8: round(v * 255 / top)."""
    a = np.clip(a.astype(np.int64), 0, top)
    return ((a * 255 + top // 2) // top).astype(np.uint8)


def _pil_array(img, channels: int) -> np.ndarray:
    """A Pillow image as (H, W) or (H, W, 3) uint8 with ``channels`` channels."""
    if img.mode in _SIXTEEN_BIT_MODES:
        a = _scale16(np.asarray(img), 65535)
        if channels == 3:
            a = np.repeat(a[..., None], 3, axis=2)
        return a
    img = img.convert("L" if channels == 1 else "RGB")
    return np.asarray(img)


def _dicom_array(path: Path, channels: int) -> np.ndarray:
    ds = _pydicom().dcmread(str(path))
    a = ds.pixel_array
    if a.ndim == 3 and int(getattr(ds, "SamplesPerPixel", 1)) == 1:
        a = a[0]  # a multi-frame image: its first frame
    if a.dtype != np.uint8:
        bits = int(getattr(ds, "BitsStored", 8 * a.dtype.itemsize))
        a = _scale16(a, (1 << bits) - 1)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        a = 255 - a
    if a.ndim == 2 and channels == 3:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim == 3 and channels == 1:
        a = np.rint(a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    return a


def _resize_array(a: np.ndarray, size, crop) -> np.ndarray:
    """Resize (shorter side to an int, or to (H, W)) with Pillow's antialiased bilinear
    filter, then cut the centre crop."""
    from PIL import Image

    if size is not None:
        h, w = a.shape[:2]
        out_h, out_w = resized_shape((h, w), size)
        if (out_h, out_w) != (h, w):
            a = np.asarray(Image.fromarray(a).resize((out_w, out_h), Image.BILINEAR))
    if crop is not None:
        ch, cw = crop
        h, w = a.shape[:2]
        top, left = (h - ch) // 2, (w - cw) // 2
        a = a[top:top + ch, left:left + cw]
    return a


def resized_shape(hw: tuple, size) -> tuple:
    """(H, W) after the ``size`` option: an int sets the shorter side (aspect kept), a pair is exact."""
    if size is None:
        return tuple(hw)
    if isinstance(size, int):
        h, w = hw
        if h <= w:
            return size, max(1, round(w * size / h))
        return max(1, round(h * size / w)), size
    return tuple(size)


def decode(path: PathLike, channels: int = 0, size=None, crop=None) -> torch.Tensor:
    """One image file as uint8 (C, H, W). channels 0 keeps the file's (1 grey, 3 colour)."""
    path = Path(path)
    if _is_dicom(path):
        a = _dicom_array(path, channels or (3 if _dicom_header(path)[2] == 3 else 1))
    else:
        from PIL import Image

        with Image.open(path) as img:
            img.load()
            a = _pil_array(img, channels or _pil_channels(img.mode))
    if size is not None or crop is not None:
        a = _resize_array(a, size, _pair(crop, "crop"))
    a = np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(a if a.flags.writeable else a.copy())


# ------------------------------------------------------------ header checks
def _pil_channels(mode: str) -> int:
    if mode in _GREY_MODES:
        return 1
    if mode in _COLOUR_MODES:
        return 3
    raise ValueError(f"pixel mode {mode!r} is not supported; expected one of {_GREY_MODES + _COLOUR_MODES}")


def _dicom_header(path: Path) -> tuple:
    ds = _pydicom().dcmread(str(path), stop_before_pixels=True)
    if not hasattr(ds, "Rows") or not hasattr(ds, "Columns"):
        raise ValueError("no Rows / Columns: not a DICOM image")
    return int(ds.Rows), int(ds.Columns), 3 if int(getattr(ds, "SamplesPerPixel", 1)) == 3 else 1


def header(path: PathLike) -> tuple:
    """(H, W, channels) from the file's header, without decoding its pixels.

    Pillow's verify() checks the structure it can check cheaply (PNG chunk CRCs, for one);
    a file cut short inside its pixel data is only found when it is decoded.
    """
    path = Path(path)
    if _is_dicom(path):
        return _dicom_header(path)
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
        mode = img.mode
        img.verify()
    return h, w, _pil_channels(mode)


def _pair(v, name: str):
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v):
        raise ValueError(f"{name} must be a positive int or an (H, W) pair of positive ints, got {v!r}")
    return v


# ------------------------------------------------------------------ loading
def load_image_folder(root: PathLike, manifest: Optional[PathLike] = "labels.csv", path_column: str = "path",
                      label_column: str = "label", size=None, crop=None, skip_unreadable: bool = False,
                      channels: Optional[int] = None, progress: bool = False) -> ImageFolderDataset:
    """A Dataset of the image files under ``root``; every file's header is checked first.

    manifest: a CSV (path relative to ``root`` unless absolute) with one row per image;
    ``path_column`` names the file (relative to ``root`` or absolute), ``label_column`` the
    class (integers, or names mapped to 0..K-1 in sorted order). Every column is kept as
    the item's metadata, so forget.by_metadata(dataset, rule) selects by any of them.
    When the manifest file does not exist (or manifest=None), the folders directly under
    ``root`` are the classes in sorted order (torchvision's ImageFolder layout).

    size: None (keep), an int (shorter side to it, aspect kept) or (H, W) (exact), with
    Pillow's antialiased bilinear filter. crop: an int or (H, W) centre crop after the
    resize. Without either, images of different sizes are an error. channels: None (every
    image must have the same number), 1 (grey) or 3 (colour).

    Missing or unreadable files are an error naming the file and its CSV row (row 1 is the
    first line after the header), raised before anything is decoded; skip_unreadable=True
    leaves them out instead and lists them in the dataset's ``skipped``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    size = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else _pair(size, "size")
    crop = _pair(crop, "crop")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    mpath = None if manifest is None else (Path(manifest) if Path(manifest).is_absolute() else root / manifest)
    if mpath is not None and mpath.is_file():
        entries, classes = _from_manifest(root, mpath, path_column, label_column)
    elif mpath is not None and manifest != "labels.csv":
        raise FileNotFoundError(f"manifest not found: {mpath}")
    else:
        entries, classes = _from_class_folders(root)
    kept, shapes, skipped = _check_files(entries, skip_unreadable, progress)
    if not kept:
        raise ValueError(f"{root}: no readable image is left ({len(skipped)} skipped)")
    channels = _common_channels(kept, shapes, channels)
    _check_sizes(kept, shapes, size, crop)
    return ImageFolderDataset([e[0] for e in kept], [e[1] for e in kept], [e[3] for e in kept], size=size,
                              crop=crop, channels=channels, skipped=skipped,
                              rows=None if entries[0][2] is None else [e[2] for e in kept], classes=classes)


def _from_manifest(root: Path, mpath: Path, path_column: str, label_column: str):
    """[(path, label, row, metadata)] from the CSV, and the class names when labels are text."""
    rows = read_table(mpath)
    columns = list(rows[0].keys())
    missing = [c for c in (path_column, label_column) if c not in columns]
    if missing:
        raise ValueError(f"{mpath}: no column {', '.join(map(repr, missing))}; the columns are {columns} "
                         "(choose them with path_column= / label_column=)")
    raw = [r[label_column] for r in rows]
    classes = None
    try:
        labels = [int(v) for v in raw]
    except ValueError:
        classes = sorted(set(raw))
        if "" in classes:
            row = raw.index("")
            raise ValueError(f"{mpath}: row {row + 1} has an empty {label_column!r}") from None
        labels = [classes.index(v) for v in raw]
    bad = next((i for i, v in enumerate(labels) if v < 0), None)
    if bad is not None:
        raise ValueError(f"{mpath}: row {bad + 1}: labels must be >= 0, got {labels[bad]}")
    entries = []
    for i, r in enumerate(rows):
        p = Path(r[path_column])
        entries.append((p if p.is_absolute() else root / p, labels[i], i, r))
    return entries, classes


def _from_class_folders(root: Path):
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no labels.csv manifest and no class folders (expected {root}/<class>/<image>, "
                         "or pass manifest=)")
    entries = []
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES:
                entries.append((p, label, None, {"path": str(p.relative_to(root)), "label": str(label),
                                                 "class": name}))
    if not entries:
        raise ValueError(f"{root}: the class folders {classes} hold no image files ({', '.join(IMAGE_SUFFIXES)})")
    return entries, classes


def _where(entry) -> str:
    return f"{entry[0]}" + ("" if entry[2] is None else f" (manifest row {entry[2] + 1})")


def _check_files(entries, skip: bool, progress: bool):
    """The readable entries with their header shapes, and (path, row, reason) of the others."""
    kept, shapes, bad = [], [], []
    for e in tqdm(entries, desc="check files", disable=not progress, leave=False):
        if not e[0].is_file():
            bad.append((str(e[0]), e[2], "missing"))
            continue
        try:
            shape = header(e[0])
        except ImportError:
            raise
        except Exception as err:  # Pillow / pydicom raise many types for a damaged file
            bad.append((str(e[0]), e[2], f"unreadable: {type(err).__name__}: {err}"))
            continue
        kept.append(e)
        shapes.append(shape)
    if bad and not skip:
        lines = [f"  {p}" + ("" if row is None else f" (manifest row {row + 1})") + f": {why}"
                 for p, row, why in bad[:10]]
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(f"{len(bad)} of {len(entries)} image files cannot be read:\n" + "\n".join(lines) + more
                         + "\nFix or remove them, or pass skip_unreadable=True to leave them out.")
    if bad:
        warnings.warn(f"left out {len(bad)} unreadable image file(s), e.g. {bad[0][0]}: {bad[0][2]}; "
                      "the dataset's .skipped lists them", stacklevel=3)
    return kept, shapes, bad


def _common_channels(kept, shapes, channels: Optional[int]) -> int:
    if channels is not None:
        return channels
    seen = {s[2] for s in shapes}
    if len(seen) > 1:
        grey = next(e for e, s in zip(kept, shapes, strict=True) if s[2] == 1)
        colour = next(e for e, s in zip(kept, shapes, strict=True) if s[2] == 3)
        raise ValueError(f"the images mix grey and colour, e.g. {_where(grey)} is grey and {_where(colour)} "
                         "is colour; pass channels=1 or channels=3")
    return seen.pop()


def _check_sizes(kept, shapes, size, crop) -> None:
    """Every image must come out of the resize / crop at one (H, W)."""
    out = {}
    for e, (h, w, _) in zip(kept, shapes, strict=True):
        rh, rw = resized_shape((h, w), size)
        if crop is not None and (crop[0] > rh or crop[1] > rw):
            raise ValueError(f"{_where(e)}: the crop {crop} is larger than the image ({rh}, {rw})"
                             + ("" if size is None else f" after resizing to {size}"))
        out.setdefault(crop or (rh, rw), e)
    if len(out) > 1:
        (s1, e1), (s2, e2) = list(out.items())[:2]
        raise ValueError(f"the images have different sizes (H, W), e.g. {_where(e1)} is {s1} and {_where(e2)} is "
                         f"{s2}{'' if size is None else f' after resizing to {size}'}; pass size= (an int: the "
                         "shorter side, or (H, W)) and/or crop= (a centre crop) to bring them to one size")
