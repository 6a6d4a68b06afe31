"""Progress bars: tqdm when enabled, a silent stand-in otherwise."""

from __future__ import annotations

from tqdm.auto import tqdm


class _NoBar:
    total = n = 0

    def update(self, k=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(total, enabled, desc, initial=0):
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, leave=False)
