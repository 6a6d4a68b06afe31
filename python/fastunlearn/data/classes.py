"""Class names of the data sets that have them, for tables and figures."""

from __future__ import annotations

from typing import Optional

CLASS_NAMES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    # MedMNIST v2's RetinaMNIST: the diabetic retinopathy grade of each fundus image.
    "retinamnist": ["grade 0 (no DR)", "grade 1 (mild)", "grade 2 (moderate)", "grade 3 (severe)",
                    "grade 4 (proliferative)"],
}


def class_names(dataset: Optional[str]) -> Optional[list]:
    """The names of ``dataset``'s classes in label order, or None when it has none on record."""
    return CLASS_NAMES.get((dataset or "").lower())


def describe(dataset: Optional[str], label: int) -> str:
    """"3 (Dress)" where the data set names its classes, else "3"."""
    names = class_names(dataset)
    return f"{label} ({names[label]})" if names and 0 <= label < len(names) else str(label)
