"""The README's three workflows, run as written (at small sizes) in a scratch folder: every
command succeeds, in order, and each makes the files the next one reads; then the same in Python."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastunlearn.data import io as data

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
# Small sizes: the commands and their order are what is checked, not the accuracy.
SMALLER = [("--train-size 6000", "--train-size 1200"), ("--train-epochs 15", "--train-epochs 2"),
           ("--train-epochs 3", "--train-epochs 1"), ("--epochs 3", "--epochs 1"),
           ("[:6000]", "[:1200]"), ("epochs=3", "epochs=1")]


def readme_blocks(marker: str, language: str, at_least: int) -> str:
    """The ``language`` code blocks between README.md's <!-- marker --> and <!-- /marker -->, made small."""
    text = README.read_text()
    section = re.search(rf"<!-- {marker}.*?-->(.*?)<!-- /{marker} -->", text, re.S)
    assert section, f"README.md lost its <!-- {marker} --> markers"
    blocks = re.findall(rf"```{language}\n(.*?)```", section.group(1), re.S)
    assert len(blocks) >= at_least, f"README.md's {marker} section should hold at least {at_least} {language} blocks"
    script = "\n".join(blocks)
    for big, small in SMALLER:
        script = script.replace(big, small)
    return script


def data_folder() -> str:
    for d in filter(None, [os.environ.get("FASTUNLEARN_DATA"), str(README.parent.parent / "shared" / "data")]):
        if os.path.exists(os.path.join(d, "retinamnist.npz")):
            return d
    pytest.skip("the README's clinical workflows need retinamnist.npz in $FASTUNLEARN_DATA (MedMNIST v2)")


def test_readme_workflows_run_in_order(tmp_path):
    folder = data_folder()
    try:
        data.load_fashion_mnist(folder)
    except FileNotFoundError as e:
        pytest.fail(f"the README's first workflow needs FashionMNIST in {folder}: {e}")
    script = readme_blocks("readme-workflows", "bash", 4).replace("/path/to/data", folder)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               FASTUNLEARN_DATA=folder)
    p = subprocess.run(["bash", "-euo", "pipefail", "-xc", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    for name in ("orig.safetensors", "retrain.safetensors", "forgot.safetensors", "retina_meta.csv",
                 "no_topcon.safetensors", "report_topcon/report.md", "report_topcon/manifest.json",
                 "no_topcon_thick.manifest.json"):
        assert (tmp_path / name).exists(), name
    assert "MISMATCH" not in p.stdout and "checks match" in p.stdout

    python = readme_blocks("readme-python", "python", 2).replace("/path/to/data", folder)
    p = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    for name in ("forgot_py.safetensors", "report_py/report.md"):
        assert (tmp_path / name).exists(), name
