"""What the fine-tune measures after each epoch: forget / remain accuracy on probe sets, or
whatever a user callable returns."""

from __future__ import annotations

from fastunlearn.data.io import as_tensors
from fastunlearn.eval.metrics import accuracy, inference_copy, predict_logits


class Probe:
    """Forget / remain accuracy on probe sets after each epoch, or a user callable."""

    def __init__(self, probe, mean, std, device):
        self.fn = None
        self.sets = {}
        if probe is None:
            return
        if callable(probe):
            self.fn = probe
            return
        if not isinstance(probe, (tuple, list)) or len(probe) != 2:
            raise TypeError("probe must be a callable model -> dict, or (forget_probe, remain_probe) with each an "
                            f"(x, y) pair or None, got {type(probe).__name__}")

        for name, data in zip(("forget", "remain"), probe):
            if data is not None:
                self.sets[name] = as_tensors(data, f"probe {name}")
        self.mean, self.std, self.device = mean, std, device

    def __call__(self, model) -> dict:
        if self.fn is not None:
            return dict(self.fn(model))

        net = inference_copy(model, self.device)
        return {f"probe_{k}_acc": accuracy(predict_logits(net, x, self.mean, self.std, device=self.device), y)
                for k, (x, y) in self.sets.items()}

    def __bool__(self):
        return self.fn is not None or bool(self.sets)
