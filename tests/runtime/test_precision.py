"""precision="auto" on CPU: bf16 only for models whose multiply-adds are mostly convolutions."""

import torch
import torch.nn as nn

from fastunlearn.runtime import precision

CPU = torch.device("cpu")


class TokenNet(nn.Module):
    """A ViT-like model: a small patch convolution, then Linear layers over the tokens."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.mlp = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.5), nn.Linear(64, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.mlp(t).mean(1))


def conv_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def test_conv_share_counts_multiply_adds_by_hand():
    # Conv2d(3, 8, 3) on 3x10x10: 8x8x8 outputs of 3*3*3 multiply-adds; Linear(512, 10): 10 x 512.
    conv, linear = 8 * 8 * 8 * 27, 10 * 512
    assert abs(precision.conv_share(conv_net(), (3, 10, 10)) - conv / (conv + linear)) < 1e-12
    # TokenNet on 3x16x16: 16 tokens; patch 16 channels x 16 positions x 48; per token 16*64 + 64*16; head 16 x 5.
    conv, linear = 16 * 16 * 48, 16 * (16 * 64 + 64 * 16) + 5 * 16
    assert abs(precision.conv_share(TokenNet(), (3, 16, 16)) - conv / (conv + linear)) < 1e-12


def test_auto_on_a_native_bf16_cpu_follows_the_conv_share(monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CPU_BF16", "1")
    assert precision.resolve_precision("auto", CPU, conv_net(), (3, 10, 10)) is torch.bfloat16
    assert precision.resolve_precision("auto", CPU, TokenNet(), (3, 16, 16)) is None
    # Without a model or a shape the share is unknown: the CPU's rule alone.
    assert precision.resolve_precision("auto", CPU, TokenNet()) is torch.bfloat16
    # A GPU, and explicit precisions, are not affected.
    assert precision.resolve_precision("auto", torch.device("cuda"), TokenNet(), (3, 16, 16)) is torch.bfloat16
    assert precision.resolve_precision("bf16", CPU, TokenNet(), (3, 16, 16)) is torch.bfloat16
    monkeypatch.setenv("FASTUNLEARN_CPU_BF16", "0")
    assert precision.resolve_precision("auto", CPU, conv_net(), (3, 10, 10)) is None


def test_counting_leaves_the_model_and_the_random_stream_alone():
    model = conv_net().train()
    model[1].eval()  # a mixed mode that must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    token = TokenNet().train()
    rng = torch.get_rng_state()
    precision.conv_share(model, (3, 10, 10))
    precision.conv_share(token, (3, 16, 16))
    assert torch.equal(rng, torch.get_rng_state())  # dropout drew nothing
    assert [m.training for m in model] == [True, False, True, True, True] and token.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BatchNorm stats untouched
    assert not any(m._forward_hooks for m in model.modules())


def test_a_model_that_cannot_run_the_count_keeps_the_cpu_rule(monkeypatch):
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.shape[0] < 2:
                raise RuntimeError("needs a batch")
            return self.fc(x.flatten(1))

    monkeypatch.setenv("FASTUNLEARN_CPU_BF16", "1")
    assert precision.conv_share(Picky(), (1, 2, 2)) is None
    assert precision.resolve_precision("auto", CPU, Picky(), (1, 2, 2)) is torch.bfloat16


def test_a_onednn_isa_cap_below_amx_turns_native_bf16_off(monkeypatch):
    """ONEDNN_MAX_CPU_ISA below AMX keeps oneDNN off the matrix units, so an AMX CPU then
    behaves as one without: "auto" must not pick bf16, and the tuning cache must not share
    its entry with the uncapped run."""
    from fastunlearn.runtime import tuning

    monkeypatch.delenv("FASTUNLEARN_CPU_BF16", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    cases = {None: True, "ALL": True, "avx512_core_amx": True, "AVX512_CORE_AMX_FP16": True,
             "AVX512_CORE_BF16": False, "avx2": False, " AVX512_CORE ": False}
    described = {}
    for cap, want in cases.items():
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert precision.cpu_has_native_bf16() is want, cap
        assert (precision.resolve_precision("auto", CPU, conv_net(), (3, 10, 10)) is torch.bfloat16) is want, cap
        described[cap] = tuning.device_description(CPU)
    assert described[None] == described["ALL"] != described["AVX512_CORE_BF16"]
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert precision.cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "ALL")
    assert precision.cpu_has_native_bf16() is False
