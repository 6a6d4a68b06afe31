"""The noise and relabel-mode codes the ops pass to their kernels are defined once in Python
(the position of each name in reference.NOISE_KINDS / RELABEL_MODES); the C++ enums must
give every name the same number."""

import re
from pathlib import Path

from fastunlearn import reference
from fastunlearn.ops.boundary_step_meta import NOISE_CODES
from fastunlearn.ops.relabel_check_meta import MODE_CODES

CSRC = Path(__file__).resolve().parents[2] / "csrc"


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
