"""Bitwise fingerprint of a fixed-seed CPU unlearning run.

Runs fastunlearn.unlearn on a small seeded case (AllCNN, random-but-seeded uint8 images),
once with hard labels (argmax relabels, label remain targets) and once soft (soft relabels,
distilled remain targets), gamma > 0 and
lamda > 0 so the noise and the pull are both exercised, and prints the SHA-256 of the
resulting weights and of the relabels. Two commits that print the same lines computed the
same numbers.

    python bench/check_bitwise.py
"""

from __future__ import annotations

import hashlib
import os

os.environ["FASTUNLEARN_CPU_BF16"] = "0"

import torch  # noqa: E402

import fastunlearn as fu  # noqa: E402

try:  # the layout with subpackages, and the flat one before it
    from fastunlearn.nn.models import create_model
except ImportError:
    from fastunlearn.models import create_model


def sha(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def case(remain_target: str, relabel: str) -> tuple[str, str]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randint(0, 256, (96, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (96,), generator=g)
    torch.manual_seed(7)
    model = create_model("allcnn", in_channels=3, num_classes=10, width=0.25).eval()
    cfg = fu.UnlearnConfig(epochs=2, batch_size=16, gamma=0.5, lamda=0.1, steps=3, eps=0.05, seed=11,
                           remain_target=remain_target, relabel=relabel, precision="fp32", compile=False)
    res = fu.unlearn(model, forget=(x[:32], y[:32]), remain=(x[32:], y[32:]), config=cfg,
                     mean=[0.5] * 3, std=[0.25] * 3, device="cpu", progress=False)
    weights = [v for _, v in sorted(res.model.state_dict().items())]
    s = res.search
    relabels = [res.relabels, res.success, s.relabels, s.success, s.margin, s.steps]
    relabels += [s.targets] if s.targets is not None else []
    return sha(weights), sha(relabels)


def main() -> None:
    torch.set_num_threads(1)
    for target, relabel in (("labels", "argmax"), ("distill", "soft")):
        w, r = case(target, relabel)
        print(f"{target}/{relabel} weights  {w}")
        print(f"{target}/{relabel} relabels {r}")


if __name__ == "__main__":
    main()
