"""The README's hospital workflow on the command line, run as written on a generated folder
(small images, a small model): bring a model without training, forget by a device, report;
one file of the folder is unreadable, so --skip-unreadable lists it beside each output."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[2] / "README.md"
# The commands and their order are what is checked: small images, one fine-tune epoch.
SMALLER = [("--size 256 --crop 224", "--size 14 --crop 12"), ("--epochs 3", "--epochs 1")]
MODELS = """
from torch import nn


def net(num_classes=5):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, num_classes))
"""
DEVICES = ["Topcon NW400", "Zeiss Visucam", "Optos"]


def readme_block() -> str:
    text = README.read_text()
    section = re.search(r"<!-- readme-hospital.*?-->(.*?)<!-- /readme-hospital -->", text, re.S)
    assert section, "README.md lost its <!-- readme-hospital --> markers"
    blocks = re.findall(r"```bash\n(.*?)```", section.group(1), re.S)
    assert len(blocks) == 1, "the hospital section should hold one bash block"
    script = blocks[0]
    for big, small in SMALLER:
        assert big in script, big
        script = script.replace(big, small)
    return script


def write_folder(root: Path, n: int, seed: int, broken: bool = False) -> None:
    """n colour PNGs of mixed sizes (16x16, 16x20) under root/img and root/labels.csv."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        label = i % 5
        h, w = (16, 16) if i % 2 else (16, 20)
        img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8) + np.uint8(35 * label)
        rel = f"img/{i:05d}.png"
        if broken and i == 7:
            (root / rel).write_bytes(b"truncated")
        else:
            Image.fromarray(img).save(root / rel)
        rows.append({"path": rel, "label": label, "device": DEVICES[i % 3], "thickness_um": 250 + i})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def clinic(tmp_path):
    write_folder(tmp_path / "scans", 90, 0, broken=True)
    write_folder(tmp_path / "scans_test", 30, 1)
    (tmp_path / "hospital_models.py").write_text(MODELS)
    namespace: dict = {}
    exec(MODELS, namespace)
    torch.manual_seed(0)
    torch.save(namespace["net"]().state_dict(), tmp_path / "net.pt")
    return tmp_path


def test_the_readme_hospital_workflow_runs_as_written(clinic):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    p = subprocess.run(["bash", "-euo", "pipefail", "-xc", readme_block()], cwd=clinic,
                       env=dict(env, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    for name in ("orig.safetensors", "no_topcon.safetensors", "no_topcon.manifest.json", "report_no_topcon/report.md",
                 "orig.skipped.csv", "no_topcon.skipped.csv", "report_no_topcon/skipped.csv"):
        assert (clinic / name).exists(), name
    listed = (clinic / "no_topcon.skipped.csv").read_text().splitlines()
    assert listed[0] == "split,path,manifest_row,reason" and len(listed) == 2 and "00007.png" in listed[1], listed
    # Topcon: every third image (30 of 90); the unreadable one (i == 7) is a Zeiss image.
    assert "forgetting 30 of 89 training images" in p.stdout, p.stdout
