import csv
import io

import numpy as np
import pytest
import torch

from fastunlearn.data import forget
from fastunlearn.data import io as data


def _labels(gen, n=300, k=7):
    return torch.randint(0, k, (n,), generator=gen)


def _manual(y, classes):
    return [i for i, v in enumerate(y.tolist()) if v in classes]


# ------------------------------------------------------------------- by_class
def test_by_class_matches_manual(gen):
    y = _labels(gen)
    for cls in (0, 3, [1, 5], [6, 2, 4]):
        idx = forget.by_class(y, cls)
        assert idx.dtype == torch.int64
        assert idx.tolist() == _manual(y, cls if isinstance(cls, list) else [cls])
    assert forget.by_class(y.numpy(), 2).tolist() == _manual(y, [2])
    assert forget.by_class(y, torch.tensor([1, 5])).tolist() == _manual(y, [1, 5])


def test_by_class_errors():
    y = torch.tensor([0, 2, 2, 0, 3])
    with pytest.raises(ValueError, match="class 4 is out of range: labels are 0..3"):
        forget.by_class(y, 4)
    with pytest.raises(ValueError, match="out of range"):
        forget.by_class(y, -1)
    with pytest.raises(ValueError, match="class 9 is out of range: labels are 0..4"):
        forget.by_class(y, [0, 9], num_classes=5)
    with pytest.raises(ValueError, match="no sample matches class 1"):
        forget.by_class(y, 1)
    with pytest.raises(TypeError):
        forget.by_class(y.float(), 1)


# ---------------------------------------------------------- fraction_of_class
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.73, 1.0])
def test_fraction_exact_counts(gen, fraction):
    y = _labels(gen, n=500)
    seed = int(torch.randint(0, 1000, (1,), generator=gen))
    for cls in (2, [0, 6]):
        classes = cls if isinstance(cls, list) else [cls]
        idx = forget.fraction_of_class(y, cls, fraction, seed=seed)
        assert torch.equal(idx, torch.sort(idx).values)
        assert len(set(idx.tolist())) == idx.numel()
        for c in classes:
            n_c = int((y == c).sum())
            assert int((y[idx] == c).sum()) == round(fraction * n_c)
        assert set(y[idx].tolist()) <= set(classes)
    if fraction == 1.0:
        assert torch.equal(forget.fraction_of_class(y, 3, 1.0), forget.by_class(y, 3))


def test_fraction_seeded(gen):
    y = _labels(gen, n=400, k=3)
    a = forget.fraction_of_class(y, 1, 0.3, seed=7)
    b = forget.fraction_of_class(y, 1, 0.3, seed=7)
    c = forget.fraction_of_class(y, 1, 0.3, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bad", [0, 0.0, -0.2, 1.5, float("nan"), True])
def test_fraction_out_of_range(bad):
    with pytest.raises(ValueError, match="fraction must be in"):
        forget.fraction_of_class(torch.tensor([0, 1, 1]), 1, bad)


def test_fraction_rounds_to_zero():
    with pytest.raises(ValueError, match="no sample matches class 1"):
        forget.fraction_of_class(torch.tensor([0, 1, 1, 0]), 1, 0.1)


# ----------------------------------------------------------------- by_indices
def test_by_indices(gen):
    n = 50
    idx = torch.randperm(n, generator=gen)[:17]
    out = forget.by_indices(n, idx)
    assert out.tolist() == sorted(idx.tolist()) and out.dtype == torch.int64
    assert forget.by_indices(n, idx.numpy().astype(np.int32)).tolist() == sorted(idx.tolist())
    assert forget.by_indices(n, [3, 1]).tolist() == [1, 3]


def test_by_indices_errors():
    with pytest.raises(ValueError, match=r"\[0, 9\].*got \[2, 10\]"):
        forget.by_indices(10, [2, 10])
    with pytest.raises(ValueError, match="got \\[-1"):
        forget.by_indices(10, [-1, 3])
    with pytest.raises(ValueError, match="duplicates, e.g. \\[4\\]"):
        forget.by_indices(10, [4, 1, 4])
    with pytest.raises(ValueError, match="no sample matches"):
        forget.by_indices(10, [])
    with pytest.raises(TypeError):
        forget.by_indices(10, [1.5])


# ---------------------------------------------------------------- by_metadata
DEVICES = ["Topcon NW400", "Zeiss Visucam 500", "Canon CR-2 AF"]


def _table(gen, n=120, with_index=True, missing=False):
    perm = torch.randperm(n, generator=gen).tolist()  # rows deliberately not in sample order
    dev = torch.randint(0, 3, (n,), generator=gen).tolist()
    thick = (torch.rand(n, generator=gen) * 20).tolist()
    rows = []
    for r in range(n):
        row = {}
        if with_index:
            row["index"] = str(perm[r])
        row["device"] = DEVICES[dev[r]]
        row["thickness"] = "" if (missing and r % 10 == 0) else f"{thick[r]:.2f}"
        rows.append(row)
    return rows


def _write(tmp_path, rows, name="meta.csv"):
    p = tmp_path / name
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return p


def _expect(rows, pred, with_index=True):
    return sorted(int(r["index"]) if with_index else i for i, r in enumerate(rows) if pred(r))


def _num(s):
    return float(s) if s != "" else float("nan")


@pytest.mark.parametrize("rule,pred", [
    ("device == Topcon NW400", lambda r: r["device"] == "Topcon NW400"),
    ("device==Canon CR-2 AF", lambda r: r["device"] == "Canon CR-2 AF"),
    ("device = Zeiss Visucam 500", lambda r: r["device"] == "Zeiss Visucam 500"),
    ("device != Topcon NW400", lambda r: r["device"] != "Topcon NW400"),
    ("thickness >= 12", lambda r: _num(r["thickness"]) >= 12),
    ("thickness <= 7.5", lambda r: _num(r["thickness"]) <= 7.5),
    ("thickness > 3", lambda r: _num(r["thickness"]) > 3),
    ("thickness < 15", lambda r: _num(r["thickness"]) < 15),
    ("thickness != 3", lambda r: not _num(r["thickness"]) == 3),
])
@pytest.mark.parametrize("missing", [False, True])
def test_by_metadata_rules(tmp_path, gen, rule, pred, missing):
    rows = _table(gen, missing=missing)
    p = _write(tmp_path, rows)
    got = forget.by_metadata(p, rule, n=len(rows))
    assert got.dtype == torch.int64
    assert got.tolist() == _expect(rows, pred)
    # the same table as a file object and as a list of dicts
    assert forget.by_metadata(io.StringIO(p.read_text()), rule).tolist() == got.tolist()
    assert forget.by_metadata(rows, rule).tolist() == got.tolist()


def test_by_metadata_numeric_equality_and_conjunction(tmp_path, gen):
    rows = [{"index": "0", "t": "12"}, {"index": "1", "t": "12.0"}, {"index": "2", "t": "11.5"},
            {"index": "3", "t": "1.2e1"}]
    assert forget.by_metadata(rows, "t == 12").tolist() == [0, 1, 3]
    assert forget.by_metadata(rows, "t == '12'").tolist() == [0]  # quoted: text
    rows = _table(gen)
    got = forget.by_metadata(rows, ["device == Topcon NW400", "thickness >= 10"])
    assert got.tolist() == _expect(rows, lambda r: r["device"] == "Topcon NW400" and float(r["thickness"]) >= 10)


def test_by_metadata_row_order_fallback(tmp_path, gen):
    rows = _table(gen, n=40, with_index=False)
    p = _write(tmp_path, rows)
    got = forget.by_metadata(p, "thickness < 10", n=40)
    assert got.tolist() == _expect(rows, lambda r: float(r["thickness"]) < 10, with_index=False)
    with pytest.raises(ValueError, match="40 rows for 41 samples"):
        forget.by_metadata(p, "thickness < 10", n=41)


def test_by_metadata_custom_index_column(gen):
    rows = [{"sample": str(i * 3), "site": "A" if i % 2 else "B"} for i in range(10)]
    assert forget.by_metadata(rows, "site == A", index_column="sample").tolist() == [3, 9, 15, 21, 27]


def test_by_metadata_errors(tmp_path, gen):
    rows = _table(gen, n=30)
    p = _write(tmp_path, rows)
    with pytest.raises(ValueError, match=r"unknown column 'site'.*\['index', 'device', 'thickness'\]"):
        forget.by_metadata(p, "site == A")
    with pytest.raises(ValueError, match="no sample matches 'device == Optos'"):
        forget.by_metadata(p, "device == Optos")
    with pytest.raises(ValueError, match="no sample matches"):
        forget.by_metadata(p, "thickness > 1000")
    with pytest.raises(ValueError, match="cannot parse rule"):
        forget.by_metadata(p, "thickness is big")
    with pytest.raises(ValueError, match="needs a numeric value"):
        forget.by_metadata(p, "device >= Topcon")
    with pytest.raises(ValueError, match="not a number"):
        forget.by_metadata(p, "device >= 3")
    with pytest.raises(ValueError, match=r"\[0, 19\]"):
        forget.by_metadata(p, "thickness >= 0", n=20)
    with pytest.raises(FileNotFoundError):
        forget.by_metadata(tmp_path / "missing.csv", "device == A")
    dup = [{"index": "1", "d": "x"}, {"index": "1", "d": "x"}]
    with pytest.raises(ValueError, match="duplicate"):
        forget.by_metadata(dup, "d == x")


def test_retina_metadata_selection(tmp_path, gen):
    n = 200
    y = torch.randint(0, 5, (n,), generator=gen)
    rows = data.make_retina_metadata((torch.zeros(n, 3, 2, 2, dtype=torch.uint8), y), seed=1,
                                     path=tmp_path / "m.csv")
    got = forget.by_metadata(tmp_path / "m.csv", "device == Topcon NW400", n=n)
    assert got.tolist() == [r["index"] for r in rows if r["device"] == "Topcon NW400"]
    got = forget.by_metadata(tmp_path / "m.csv", "macular_thickness_um >= 290", n=n)
    assert got.tolist() == [r["index"] for r in rows if r["macular_thickness_um"] >= 290]


# ----------------------------------------------------------------------- split
def test_split_partitions(gen):
    n = 23
    x = torch.rand(n, 2, 3, 3, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    idx = torch.randperm(n, generator=gen)[:8]
    (xf, yf), (xr, yr) = forget.split(x, y, idx)
    s = sorted(idx.tolist())
    rest = [i for i in range(n) if i not in s]
    assert torch.equal(xf, x[s]) and torch.equal(yf, y[s])
    assert torch.equal(xr, x[rest]) and torch.equal(yr, y[rest])
    with pytest.raises(ValueError, match="duplicates"):
        forget.split(x, y, [1, 1])
