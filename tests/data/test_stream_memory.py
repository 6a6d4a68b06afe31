"""Peak memory of an unlearning job from an image folder does not grow with the number of images.

Each size runs in a fresh subprocess (peak RSS is per process); the images are PNG files
written by the test, 3x64x64, a few hundred distinct ones repeated under new names.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

JOB = textwrap.dedent("""
    import csv, io, json, os, resource, sys
    import numpy as np
    import torch, torch.nn as nn
    from PIL import Image
    import fastunlearn as fu
    from fastunlearn.data import forget
    from fastunlearn.data.image_folder import load_image_folder

    root, n = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rng = np.random.default_rng(0)
    distinct = []
    for k in range(256):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(base).resize((64, 64), Image.BILINEAR).save(buf, format="PNG")
        distinct.append(buf.getvalue())
    with open(os.path.join(root, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "site"])
        for i in range(n):
            rel = f"img/{i:06d}.png"
            with open(os.path.join(root, rel), "wb") as g:
                g.write(distinct[i % 256])
            w.writerow([rel, i % 4, "A" if i % 8 else "B"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 4))
    ds = load_image_folder(root)
    idx = forget.by_metadata(ds, "site == A")
    cfg = fu.UnlearnConfig(epochs=1, batch_size=256, lr=0.01, search_batch_size=256, loader_workers=1)
    res = fu.unlearn(model, torch.utils.data.Subset(ds, idx.tolist()), config=cfg, progress=False)
    assert res.relabels.shape[0] == idx.numel()
    mib = lambda who: resource.getrusage(who).ru_maxrss / 1024
    print(json.dumps({"forget": idx.numel(), "self_mib": mib(resource.RUSAGE_SELF),
                      "children_mib": mib(resource.RUSAGE_CHILDREN)}))
""")


def run_job(tmp_path, n):
    root = tmp_path / f"n{n}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", JOB, str(root), str(n)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_forget_set(tmp_path):
    small, large = run_job(tmp_path, 5715), run_job(tmp_path, 45715)
    # 7 of every 8 images are at site A: 5,000 and 40,000 forget images.
    assert small["forget"] == 5000 and large["forget"] == 40000
    print(f"peak RSS (MiB): 5,000 -> {small}, 40,000 -> {large}")
    assert large["self_mib"] - small["self_mib"] < 300
    assert large["children_mib"] - small["children_mib"] < 300
