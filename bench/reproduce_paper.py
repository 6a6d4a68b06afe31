"""`python bench/reproduce_paper.py --out runs/paper`: the reproduction study (bench_paper.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_paper import main  # noqa: E402

if __name__ == "__main__":
    main()
