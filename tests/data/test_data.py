import gzip
import io
import struct

import numpy as np
import pytest
import torch

from fastunlearn.data import io as data


def _np_rng(gen):
    return np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))


def write_idx(path, arr, gz):
    """IDX written by hand (independent of data.save_idx)."""
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
    code = codes[arr.dtype.type]
    payload = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    payload += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)


# ------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("shape", [(7, 5, 3), (1, 28, 28), (13,)])
def test_idx_roundtrip_uint8(tmp_path, gen, gz, shape):
    arr = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).numpy()
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, arr, gz)
    t = data.load_idx(p)
    assert t.dtype == torch.uint8 and tuple(t.shape) == shape
    assert np.array_equal(t.numpy(), arr)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_other_types(tmp_path, gen, dtype):
    rng = _np_rng(gen)
    arr = (rng.normal(size=(4, 3, 2)) * 100).astype(dtype)
    write_idx(tmp_path / "b", arr, gz=False)
    t = data.load_idx(tmp_path / "b")
    assert np.array_equal(t.numpy(), arr)
    assert t.numpy().dtype == np.dtype(dtype)


def test_idx_gzip_detected_by_content(tmp_path, gen):
    arr = torch.randint(0, 256, (3, 4, 4), generator=gen, dtype=torch.uint8).numpy()
    write_idx(tmp_path / "no_suffix", arr, gz=True)
    assert np.array_equal(data.load_idx(tmp_path / "no_suffix").numpy(), arr)


def test_save_idx_roundtrip(tmp_path, gen):
    arr = torch.randint(0, 256, (6, 9, 4), generator=gen, dtype=torch.uint8)
    data.save_idx(arr, tmp_path / "c.gz")
    assert open(tmp_path / "c.gz", "rb").read(2) == b"\x1f\x8b"
    assert torch.equal(data.load_idx(tmp_path / "c.gz"), arr)


def test_idx_bad_magic(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x03" + b"\x00" * 20)
    with pytest.raises(ValueError, match="magic"):
        data.load_idx(tmp_path / "bad")
    (tmp_path / "badtype").write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match="magic"):
        data.load_idx(tmp_path / "badtype")


def test_idx_truncated(tmp_path):
    (tmp_path / "short").write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 2, 4, 4) + b"\x00" * 31)
    with pytest.raises(ValueError, match="32 data bytes"):
        data.load_idx(tmp_path / "short")


# -------------------------------------------------------------- Fashion-MNIST
def _fake_fashion(root, gen, prefix="", gz=True, n=(12, 5)):
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, name, k in (("train", "train", n[0]), ("t10k", "test", n[1])):
        x = torch.randint(0, 256, (k, 28, 28), generator=gen, dtype=torch.uint8).numpy()
        y = torch.randint(0, 10, (k,), generator=gen).numpy().astype(np.uint8)
        sfx = ".gz" if gz else ""
        write_idx(root / f"{prefix}{split}-images-idx3-ubyte{sfx}", x, gz)
        write_idx(root / f"{prefix}{split}-labels-idx1-ubyte{sfx}", y, gz)
        out[name] = (x, y)
    return out


def _check_fashion(loaded, truth):
    for split in ("train", "test"):
        x, y = loaded[split]
        assert x.dtype == torch.uint8 and x.shape == (truth[split][0].shape[0], 1, 28, 28)
        assert y.dtype == torch.int64
        assert np.array_equal(x[:, 0].numpy(), truth[split][0])
        assert np.array_equal(y.numpy(), truth[split][1].astype(np.int64))


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv("FASTUNLEARN_DATA", raising=False)


def test_fashion_debian_names(tmp_path, gen, no_system_data):
    truth = _fake_fashion(tmp_path / "d", gen)
    _check_fashion(data.load_fashion_mnist(tmp_path / "d"), truth)


def test_fashion_prefixed_raw_names_in_subfolder(tmp_path, gen, no_system_data):
    truth = _fake_fashion(tmp_path / "d" / "fashion-mnist", gen, prefix="fashion-mnist-", gz=False)
    _check_fashion(data.load_fashion_mnist(tmp_path / "d"), truth)


def test_fashion_env_and_system_dirs(tmp_path, gen, no_system_data, monkeypatch):
    truth = _fake_fashion(tmp_path / "env", gen, prefix="fashion-mnist-")
    monkeypatch.setenv("FASTUNLEARN_DATA", str(tmp_path / "env"))
    _check_fashion(data.load_fashion_mnist(), truth)
    # root wins over the environment
    truth2 = _fake_fashion(tmp_path / "root", gen, n=(3, 2))
    _check_fashion(data.load_fashion_mnist(tmp_path / "root"), truth2)
    monkeypatch.delenv("FASTUNLEARN_DATA")
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (str(tmp_path / "env"),))
    _check_fashion(data.load_fashion_mnist(), truth)


def test_fashion_not_found(tmp_path, no_system_data):
    with pytest.raises(FileNotFoundError) as e:
        data.load_fashion_mnist(tmp_path / "empty")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "empty") in msg and str(tmp_path / "nowhere") in msg


def test_fashion_incomplete_dir(tmp_path, gen, no_system_data):
    _fake_fashion(tmp_path / "d", gen)
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError):
        data.load_fashion_mnist(tmp_path / "d")


def test_load_default(tmp_path, gen, no_system_data):
    truth = _fake_fashion(tmp_path / "d", gen)
    name, splits = data.load_default(tmp_path / "d")
    assert name == "fashion-mnist"
    _check_fashion(splits, truth)
    name, splits = data.load_default(tmp_path / "missing")
    assert name == "digits" and splits["train"][0].shape[1:] == (1, 8, 8)


# ------------------------------------------------------------------- MedMNIST
@pytest.mark.parametrize("rgb", [True, False])
def test_medmnist_roundtrip(tmp_path, gen, rgb):
    rng = _np_rng(gen)
    arrays = {}
    for split, n in (("train", 11), ("val", 3), ("test", 5)):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 5, (n, 1)).astype(np.uint8)
    np.savez_compressed(tmp_path / "m.npz", **arrays)
    out = data.load_medmnist(tmp_path / "m.npz")
    assert sorted(out) == ["test", "train", "val"]
    for split in out:
        x, y = out[split]
        imgs = arrays[f"{split}_images"]
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and y.dim() == 1
        for i in range(imgs.shape[0]):
            for c in range(x.shape[1]):
                expect = imgs[i, :, :, c] if rgb else imgs[i]
                assert np.array_equal(x[i, c].numpy(), expect)
        assert x.shape[1] == (3 if rgb else 1)
        assert np.array_equal(y.numpy(), arrays[f"{split}_labels"][:, 0].astype(np.int64))


def test_medmnist_errors(tmp_path):
    np.savez(tmp_path / "k.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="train_labels"):
        data.load_medmnist(tmp_path / "k.npz")
    z = {f"{s}_images": np.zeros((2, 4, 4), np.uint8) for s in ("train", "val", "test")}
    z.update({f"{s}_labels": np.zeros((2, 14), np.uint8) for s in ("train", "val", "test")})
    np.savez(tmp_path / "ml.npz", **z)
    with pytest.raises(ValueError, match="multi-label"):
        data.load_medmnist(tmp_path / "ml.npz")


# ------------------------------------------------------------------ digits/csv
def test_load_digits_matches_sklearn():
    from sklearn.datasets import load_digits as sk

    d = sk()
    splits = data.load_digits(test_fraction=0.25, seed=3)
    x = torch.cat([splits["train"][0], splits["test"][0]])
    y = torch.cat([splits["train"][1], splits["test"][1]])
    assert x.dtype == torch.uint8 and x.shape == (1797, 1, 8, 8) and y.dtype == torch.int64
    expect = np.rint(d.images * 255 / 16).astype(np.uint8)
    # the split is a permutation of sklearn's rows: match them by content
    def key(a, b):
        return sorted(zip(b.tolist(), [r.tobytes() for r in a.reshape(len(a), -1)]))
    assert key(x.numpy(), y.numpy()) == key(expect, d.target)
    assert splits["test"][0].shape[0] == 450  # sklearn rounds the test share up
    # stratified: every class keeps its share within one sample
    counts = np.bincount(d.target)
    test_counts = np.bincount(splits["test"][1].numpy(), minlength=10)
    assert np.all(np.abs(test_counts - counts * 0.25) <= 1)


def test_load_digits_seeded():
    a, b, c = data.load_digits(seed=1), data.load_digits(seed=1), data.load_digits(seed=2)
    assert torch.equal(a["train"][0], b["train"][0]) and torch.equal(a["test"][1], b["test"][1])
    assert not torch.equal(a["train"][0], c["train"][0])


def test_load_digits_csv_equals_sklearn_loader():
    from importlib.resources import files

    csv_path = files("sklearn.datasets") / "data" / "digits.csv.gz"
    a = data.load_digits_csv(str(csv_path), seed=5)
    b = data.load_digits(seed=5)
    for s in ("train", "test"):
        assert torch.equal(a[s][0], b[s][0]) and torch.equal(a[s][1], b[s][1])


def test_load_digits_csv_bad_columns(tmp_path):
    (tmp_path / "d.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="65 columns"):
        data.load_digits_csv(tmp_path / "d.csv")


@pytest.mark.parametrize("header", [False, True])
def test_load_mnist_csv(tmp_path, gen, header):
    rng = _np_rng(gen)
    n = 60
    pix = rng.integers(0, 256, (n, 784))
    lab = np.repeat(np.arange(10), n // 10)
    rng.shuffle(lab)
    buf = io.StringIO()
    if header:
        buf.write(",".join([f"p{i}" for i in range(784)] + ["label"]) + "\n")
    np.savetxt(buf, np.column_stack([pix, lab]), fmt="%d", delimiter=",")
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode()))
    whole = data.load_mnist_csv(tmp_path / "m.csv.gz", test_fraction=0)
    x, y = whole["train"]
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8
    assert np.array_equal(x.reshape(n, -1).numpy(), pix) and np.array_equal(y.numpy(), lab)
    sp = data.load_mnist_csv(tmp_path / "m.csv.gz", test_fraction=0.5, seed=0)
    assert sp["train"][0].shape[0] == sp["test"][0].shape[0] == n // 2
    assert np.array_equal(np.bincount(sp["test"][1].numpy()), np.full(10, 3))


# --------------------------------------------------------------- as_tensors
class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_as_tensors_pairs_and_datasets(gen):
    x = torch.randint(0, 256, (9, 3, 5, 7), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 4, (9,), generator=gen)
    for given in [(x, y), (x.numpy(), y.numpy()), [x, y.to(torch.int32)], torch.utils.data.TensorDataset(x, y),
                  _ListDataset([(x[i].numpy(), int(y[i])) for i in range(9)])]:
        xx, yy = data.as_tensors(given)
        assert torch.equal(xx, x) and torch.equal(yy, y) and yy.dtype == torch.int64
    xf = torch.rand(9, 1, 4, 4, generator=gen)
    xx, yy = data.as_tensors((xf[:, 0], y.double().reshape(-1, 1)))
    assert torch.equal(xx, xf) and torch.equal(yy, y)
    xx, _ = data.as_tensors((x.to(torch.int64), y))
    assert xx.dtype == torch.uint8 and torch.equal(xx, x)


def test_as_tensors_pil(gen):
    from PIL import Image

    arr = torch.randint(0, 256, (3, 6, 5, 3), generator=gen, dtype=torch.uint8).numpy()
    ds = _ListDataset([(Image.fromarray(a), i) for i, a in enumerate(arr)])
    xx, yy = data.as_tensors(ds)
    assert xx.shape == (3, 3, 6, 5)
    assert np.array_equal(xx.numpy(), arr.transpose(0, 3, 1, 2)) and yy.tolist() == [0, 1, 2]


def test_as_tensors_errors(gen):
    x = torch.rand(4, 1, 5, 5, generator=gen)
    with pytest.raises(ValueError, match="forget: 4 images but 3 labels"):
        data.as_tensors((x, torch.zeros(3, dtype=torch.int64)), "forget")
    with pytest.raises(ValueError, match="remain must be an"):
        data.as_tensors((x, x, x), "remain")
    with pytest.raises(TypeError, match="test must be"):
        data.as_tensors(x, "test")
    with pytest.raises(ValueError, match="channels-last"):
        data.as_tensors((torch.rand(4, 28, 28, 3), torch.zeros(4, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        data.as_tensors((torch.full((4, 1, 2, 2), 300), torch.zeros(4, dtype=torch.int64)))
    with pytest.raises(ValueError, match="whole numbers"):
        data.as_tensors((x, torch.tensor([0.5, 1, 2, 3])))
    with pytest.raises(ValueError, match=">= 0"):
        data.as_tensors((x, torch.tensor([0, -1, 2, 3])))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        data.as_tensors((torch.rand(4, 5), torch.zeros(4, dtype=torch.int64)))


def test_to_float_and_channel_stats(gen):
    x = torch.randint(0, 256, (37, 3, 5, 6), generator=gen, dtype=torch.uint8)
    f = data.to_float(x)
    assert f.dtype == torch.float32 and torch.equal(f, x.float() / 255)
    assert data.to_float(f) is f
    assert data.to_float(f.double()).dtype == torch.float32
    mean, std = data.channel_stats(x, chunk=8)
    a = x.numpy().astype(np.float64) / 255
    assert np.allclose(mean, a.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(std, a.std(axis=(0, 2, 3)), atol=1e-7)
    mean_f, std_f = data.channel_stats(f)
    assert np.allclose(mean_f, mean, atol=1e-6) and np.allclose(std_f, std, atol=1e-6)


# ------------------------------------------------------------- retina metadata
def test_retina_metadata(tmp_path, gen):
    n = 1500
    y = torch.randint(0, 5, (n,), generator=gen)
    x = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
    rows = data.make_retina_metadata({"train": (x, y)}, seed=4, path=tmp_path / "meta.csv")
    assert len(rows) == n and tuple(rows[0]) == data.RETINA_METADATA_COLUMNS
    assert [r["index"] for r in rows] == list(range(n))
    assert {r["device"] for r in rows} == set(data.RETINA_DEVICES)
    thick = np.array([r["macular_thickness_um"] for r in rows])
    assert np.corrcoef(thick, y.numpy())[0, 1] > 0.3
    assert rows == data.make_retina_metadata((x, y), seed=4)
    assert rows != data.make_retina_metadata((x, y), seed=5)
    text = (tmp_path / "meta.csv").read_text()
    assert text.splitlines()[0] == "index,device,macular_thickness_um"
    assert len(text.splitlines()) == n + 1
