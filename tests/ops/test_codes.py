"""The noise and relabel-mode codes the ops pass to their kernels are defined once in Python
(the position of each name in reference.NOISE_KINDS / RELABEL_MODES); the C++ enums must
give every name the same number, and the Triton kernels take theirs from the Python dicts."""

import re
from pathlib import Path

import pytest

from fastunlearn import reference
from fastunlearn.ops.boundary_step_meta import NOISE_CODES
from fastunlearn.ops.relabel_check_meta import MODE_CODES

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
# A mode or noise code compared with a number, as in "MODE == 3", "noise != 0" or "mode in (2, 3)".
LITERAL_CODE = re.compile(r"\b(?:MODE|NOISE|mode|noise)\s*(?:[=!<>]=|[<>]|in)\s*\(?\s*\d")


def cpp_enum(header: str, name: str) -> dict:
    text = (CSRC / header).read_text()
    body = re.search(r"enum\s+" + name + r"\s*:\s*int\s*\{([^}]*)\}", text)
    assert body, f"enum {name} not found in csrc/{header}"
    return {k: int(v) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", body.group(1))}


def camel(name: str) -> str:
    return "k" + "".join(part.capitalize() for part in name.split("_"))


def test_noise_codes_match_the_cpp_enum():
    assert NOISE_CODES == {name: i for i, name in enumerate(reference.NOISE_KINDS)}
    assert cpp_enum("philox.h", "Noise") == {camel(k): v for k, v in NOISE_CODES.items()}


def test_relabel_mode_codes_match_the_cpp_enum():
    assert MODE_CODES == {name: i for i, name in enumerate(reference.RELABEL_MODES)}
    assert cpp_enum("relabel_modes.h", "RelabelMode") == {camel(k): v for k, v in MODE_CODES.items()}


def test_the_enum_reader_reads():
    assert camel("nearest_incorrect") == "kNearestIncorrect"
    assert cpp_enum("relabel_modes.h", "RelabelMode")["kTopk"] == 3


def test_triton_kernels_take_the_codes_from_python():
    pytest.importorskip("triton")
    from fastunlearn.kernels import philox, relabel_check

    names = {"normal": philox.NORMAL, "laplace": philox.LAPLACE, "cauchy": philox.CAUCHY, "uniform": philox.UNIFORM}
    assert {k: v.value for k, v in names.items()} == NOISE_CODES
    modes = {"nearest_incorrect": relabel_check.NEAREST_INCORRECT, "soft": relabel_check.SOFT,
             "topk": relabel_check.TOPK}
    assert {k: v.value for k, v in modes.items()} == {k: MODE_CODES[k] for k in modes}


def test_kernels_and_ops_compare_no_code_with_a_number():
    paths = sorted((ROOT / "kernels").glob("*.py")) + sorted((ROOT / "python/fastunlearn/ops").glob("*.py"))
    found = [f"{path.name}: {m.group(0)}" for path in paths for m in LITERAL_CODE.finditer(path.read_text())]
    assert found == []
    assert LITERAL_CODE.search("if MODE == 3:") and LITERAL_CODE.search("mode in (2, 3)")
    assert not LITERAL_CODE.search("if MODE == TOPK:")
