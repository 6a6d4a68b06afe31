"""Progress bars: tqdm when enabled, a silent stand-in otherwise."""

from __future__ import annotations

from tqdm.auto import tqdm


class _NoBar:
    total = n = 0

    def update(self, k=1):
        pass

    def close(self):
        pass


def progress_bar(total, enabled, desc):
    if not enabled:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False)
