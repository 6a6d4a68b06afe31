"""UnlearnConfig: every knob of the method, validated when it is built."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from fastunlearn.reference import LAMDA_SCHEDULES, NOISE_KINDS, RELABEL_MODES
from fastunlearn.runtime.backends import BACKENDS

REFRESH_MODES = ("auto", "epoch", "once")
REMAIN_TARGETS = ("labels", "distill")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# train.train_classifier: no fp16 there, which would need loss scaling.
TRAIN_PRECISIONS = ("fp32", "bf16", "auto")
# The switches that take auto | True | False: compile, cuda_graph, fuse_batch_norm.
AUTO_ON_OFF = ("auto", True, False)
COMPAT = (None, "authors")
# The image augmentations of the fine-tune and of train.train_classifier.
AUGMENT_MODES = ("crop", "flip", "crop+flip")
BATCHNORM_MODES = ("train", "frozen")
# UnlearnConfig.recommended(): see its docstring and bench/study_recipe.py.
RECIPE_REMAIN_REG = 3.0
RECIPE_LR = 3e-4
RECIPE_STEPS = 8
RECIPE_EPOCHS = (1, 8)
# The recipe's head re-fit: epochs, on at most this many remain images (head_refit_lr's default).
RECIPE_HEAD_REFIT_EPOCHS = 10
RECIPE_HEAD_REFIT_SAMPLES = 300


def recipe_epochs(forget_size: int, batch_size: int, steps: int = RECIPE_STEPS) -> int:
    """The recipe's epochs: the whole number of epochs whose steps come nearest ``steps`` steps
    of ``batch_size`` forget samples (an epoch is ceil(forget_size / batch_size) steps), clipped
    to RECIPE_EPOCHS."""
    lo, hi = RECIPE_EPOCHS
    per_epoch = -(-forget_size // batch_size)
    return min(hi, max(lo, round(steps / per_epoch)))


@dataclass(frozen=True)
class UnlearnConfig:
    """Settings of one unlearning run. Defaults are the authors' published settings.

    eps            L-inf radius of the search ball, in pixel units ([0, 1] images).
    steps          inner steps T; 1 is FGSM.
    alpha          step size; None means eps for T = 1 and 2.5 * eps / T otherwise.
    gamma, noise   scale and law of the perturbation z (normal, laplace, cauchy, uniform(-1,1)).
    lamda, lamda_schedule   pull back towards the original image, and how it decays:
                   constant | inverse lamda/(t+1) | exponential lamda exp(-lamda_rate (t+1)) |
                   linear lamda (1 - (t+1)/H), floored at 0. The index t counts inner steps
                   (H = steps) when steps > 1, and refreshes (H = number of refreshes) when
                   steps = 1. lambda_t is never negative, so the term only ever pulls.
    lamda_rate     rate of the exponential schedule (per schedule index).
    quantize       q of the 1/q pixel grid (255 for 8-bit images); 0 turns rounding off.
    relabel        argmax | nearest_incorrect | soft | topk; topk: k for relabel="topk".
    early_exit     stop searching a sample once it has crossed the boundary (T > 1).
    random_start   start the search from a uniform point in the eps ball.
    refresh        when the search is redone with fresh noise: epoch | once | auto (once when
                   the search is deterministic, else epoch). Each sample is searched once per
                   epoch, so "epoch" already gives every sample a fresh draw each time the
                   published loop would; "iteration" is refused: the published loop's other
                   use of the iteration, the lambda schedule's clock, is compat="authors".
    epochs, lr, momentum, batch_size   the fine-tune (SGD).
    augment        None | crop | flip | crop+flip: the fine-tune's forget and remain images,
                   on the device, each epoch afresh (crop: zero-pad by H/8, a random window;
                   flip: left-right with probability 1/2). The search runs on the images as
                   they are, so a relabel is the one found for the unshifted image.
    remain_reg     rho, weight of the remain-set term; remain_target: labels | distill.
    joint_batch    one forward over forget + remain batches together (BatchNorm sees both);
                   False keeps the authors' separate forwards.
    batchnorm      train (the authors': BatchNorm layers normalise with each batch's statistics
                   and update their running ones) | frozen (they normalise with the running
                   statistics and keep them; their affine weights still train). A batch made
                   only of forget samples otherwise rewrites the statistics the remain set
                   relies on.
    search_batch_size   samples per search chunk; None sizes it from free memory.
    seed           seeds the noise and the batch order.
    precision      auto | fp32 | bf16 | fp16. auto is bf16 on GPUs, and on CPUs with AMX for
                   models whose multiply-adds are mostly in convolutions
                   (precision.CPU_BF16_MIN_CONV_SHARE), else fp32 (AVX512-BF16 alone runs
                   bf16 convolutions slower than fp32; a ViT's Linear layers at small widths
                   run slower in bf16 on CPU). bf16 is
                   autocast: weights, gradients and the optimizer stay fp32; the search's
                   unsure samples are redone in fp32. Under auto, a small search on a GPU
                   (samples x refreshes x input values x parameters below
                   precision.SMALL_SEARCH_FP32_WORK) runs in fp32 outright: it is bound by
                   launches, and one fp32 search beats a bf16 one plus its recheck.
    compile        torch.compile the train step: auto (= False) | True | False. On a GPU the
                   compiled step runs under CUDA graphs; its compile costs tens of seconds
                   (more than a whole eager run of the default job, see bench/RESULTS.md),
                   so it is worth it only for long or repeated runs.
    cuda_graph     capture the eager train step (forward, backward, SGD) in a CUDA graph and
                   replay it: auto (on for CUDA in one process with compile off) | True | False.
                   A replay costs one launch instead of hundreds. Each batch shape runs two
                   eager steps, then is captured (up to 4 shapes; more run eagerly); results
                   equal the eager step's within float rounding.
    fuse_batch_norm run the train step's BatchNorm2d layers (each with the ReLU after it in an
                   nn.Sequential) as the native batch_norm_relu op: auto (on CPU, where it makes
                   the step faster, see bench/RESULTS.md; off on CUDA) | True (wherever the op
                   has a native kernel) | False (PyTorch's
                   modules). Results equal the modules' within float rounding.
    search_compile torch.compile the search's frozen model (True / False). The compile costs
                   seconds to tens of seconds once per process and shape family; each search
                   step then runs faster (see bench/RESULTS.md), so it pays for large forget
                   sets or a warm Unlearner.
                   Inductor's fused kernels round differently, so a sample at a near-tie may
                   relabel differently than without it.
    backend        backend of the fused ops: auto | torch | cpu | cuda | triton. "torch" also
                   runs the CPU train step's BatchNorm + ReLU as PyTorch's modules (unfused).
    compat         None, or "authors" to reproduce the published code (README, "Where
                   fastunlearn's default differs from the published code"): the search in
                   their attack space with their constants, their batch-mean fp32 gradient
                   (batch_size rows; a confident sample's underflows and it does not move),
                   their lambda term + lamda (normalised iterate - original) on the 1-based
                   global iteration clock, clamp then round half to even, fp32 throughout;
                   soft / topk targets are their raw logits / top-k logits over their sum;
                   the fine-tune draws a remain batch every iteration and runs separate
                   forwards. gamma > 0 draws the same law at the same scale (not their draws).
    recheck_margin bf16 / fp16 search only: a sample whose closest decision (relabel, success,
                   early exit) lay within recheck_margin x its rounding noise, r |z|max +
                   sqrt(r / D) L (r = finfo(dtype).eps, z the last logits, D pixels per sample,
                   L the length of the logit path), is searched again in fp32, so its labels
                   are the fp32 search's. 0 turns the recheck off; ignored in fp32. 6 was the
                   smallest value that kept >= 99.9 % of an fp32 search's labels on every
                   model measured (bench/bench_search.py --precision bf16).
    loader_workers forget / remain sets given as a Dataset: DataLoader worker processes that
                   decode the search's chunks and the fine-tune's batches ahead of use (0:
                   decode in the calling process; None: up to 4, one core left to the step).
                   Does not change any result.
    deterministic  run under torch.use_deterministic_algorithms (cuDNN deterministic, the cuBLAS
                   workspace setting on CUDA; restored afterwards, see runtime/determinism.py):
                   two runs of the same job give bitwise-equal weights. An op with no
                   deterministic kernel then raises instead of running.
    head_refit_epochs, head_refit_lr, head_refit_samples   after the fine-tune, re-train the
                   classifier head alone on the remain set for this many epochs (0: not at all,
                   the paper's loop) at this SGD learning rate, on at most head_refit_samples
                   remain images (a seeded subset; None: all) and on the forget images of any
                   class the remain set no longer has, with their last relabels (so the head
                   does not give a forgotten class back). The backbone and its BatchNorm
                   statistics stay frozen; the head's inputs are computed once and the head is
                   trained on them (fastunlearn.head_refit). Needs a remain set.
    """

    eps: float = 0.1
    steps: int = 1
    alpha: Optional[float] = None
    gamma: float = 0.0
    lamda: float = 0.0
    noise: str = "normal"
    lamda_schedule: str = "constant"
    lamda_rate: float = 0.01
    quantize: int = 255
    relabel: str = "argmax"
    topk: int = 3
    early_exit: bool = True
    random_start: bool = False
    refresh: str = "auto"
    epochs: int = 10
    lr: float = 1e-5
    momentum: float = 0.9
    batch_size: int = 64
    augment: Optional[str] = None
    remain_reg: float = 0.0
    remain_target: str = "labels"
    joint_batch: bool = False
    batchnorm: str = "train"
    search_batch_size: Optional[int] = None
    seed: int = 0
    precision: str = "auto"
    compile: object = "auto"
    cuda_graph: object = "auto"
    fuse_batch_norm: object = "auto"
    search_compile: bool = False
    backend: str = "auto"
    compat: Optional[str] = None
    recheck_margin: float = 6.0
    loader_workers: Optional[int] = None
    deterministic: bool = False
    head_refit_epochs: int = 0
    head_refit_lr: float = 1e-2
    head_refit_samples: Optional[int] = None

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"UnlearnConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        def number(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "a finite number")
            return v

        if number("eps") <= 0 or self.eps > 1:
            bad("eps", "in (0, 1] (pixel units)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            bad("steps", "an integer >= 1")
        if self.alpha is not None and number("alpha") <= 0:
            bad("alpha", "None or > 0")
        if number("gamma") < 0:
            bad("gamma", ">= 0")
        if number("lamda") < 0:
            bad("lamda", ">= 0")
        if self.noise not in NOISE_KINDS:
            bad("noise", f"one of {NOISE_KINDS}")
        if number("lamda_rate") < 0:
            bad("lamda_rate", ">= 0")
        if self.lamda_schedule not in LAMDA_SCHEDULES:
            bad("lamda_schedule", f"one of {LAMDA_SCHEDULES}")
        if isinstance(self.quantize, bool) or not isinstance(self.quantize, int) or self.quantize < 0:
            bad("quantize", "an integer >= 0 (0 turns rounding off)")
        if self.quantize and self.eps * self.quantize < 1:
            bad("eps", f">= one grid step 1/quantize = {1 / self.quantize:.5g}, or quantize=0")
        if self.relabel not in RELABEL_MODES:
            bad("relabel", f"one of {RELABEL_MODES}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            bad("topk", "an integer >= 1")
        if self.refresh == "iteration":
            raise ValueError("UnlearnConfig.refresh='iteration' is not supported: each sample is searched once "
                             "per epoch, so refresh='epoch' gives the same fresh draws per sample; for the "
                             "published per-iteration lambda schedule use compat='authors'")
        if self.refresh not in REFRESH_MODES:
            bad("refresh", f"one of {REFRESH_MODES}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            bad("epochs", "an integer >= 0")
        if number("lr") <= 0:
            bad("lr", "> 0")
        if not 0 <= number("momentum") < 1:
            bad("momentum", "in [0, 1)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad("batch_size", "an integer >= 1")
        if self.augment is not None and self.augment not in AUGMENT_MODES:
            bad("augment", f"None or one of {AUGMENT_MODES}")
        if number("remain_reg") < 0:
            bad("remain_reg", ">= 0")
        if self.remain_target not in REMAIN_TARGETS:
            bad("remain_target", f"one of {REMAIN_TARGETS}")
        if not isinstance(self.joint_batch, bool):
            bad("joint_batch", "True or False")
        if self.batchnorm not in BATCHNORM_MODES:
            bad("batchnorm", f"one of {BATCHNORM_MODES}")
        if self.search_batch_size is not None and (
                not isinstance(self.search_batch_size, int) or self.search_batch_size < 1):
            bad("search_batch_size", "None or an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            bad("seed", "an integer in [0, 2**63)")
        if self.precision not in PRECISIONS:
            bad("precision", f"one of {PRECISIONS}")
        if self.compile not in AUTO_ON_OFF:
            bad("compile", "'auto', True or False")
        if self.cuda_graph not in AUTO_ON_OFF:
            bad("cuda_graph", "'auto', True or False")
        if self.fuse_batch_norm not in AUTO_ON_OFF:
            bad("fuse_batch_norm", "'auto', True or False")
        if not isinstance(self.search_compile, bool):
            bad("search_compile", "True or False")
        if self.backend not in BACKENDS:
            bad("backend", f"one of {BACKENDS}")
        if self.compat not in COMPAT:
            bad("compat", "None or 'authors'")
        if not isinstance(self.deterministic, bool):
            bad("deterministic", "True or False")
        if self.compat == "authors" and (self.relabel == "nearest_incorrect" or self.joint_batch):
            raise ValueError("compat='authors' takes relabel argmax / soft / topk and joint_batch=False (the "
                             f"published loop), got relabel={self.relabel!r}, joint_batch={self.joint_batch}")
        if number("recheck_margin") < 0 or self.recheck_margin == float("inf"):
            bad("recheck_margin", "a finite number >= 0 (0 turns the fp32 recheck off)")
        if isinstance(self.head_refit_epochs, bool) or not isinstance(self.head_refit_epochs, int) \
                or self.head_refit_epochs < 0:
            bad("head_refit_epochs", "an integer >= 0 (0: no head re-fit)")
        if number("head_refit_lr") <= 0:
            bad("head_refit_lr", "> 0")
        if self.head_refit_samples is not None and (isinstance(self.head_refit_samples, bool) or not isinstance(
                self.head_refit_samples, int) or self.head_refit_samples < 1):
            bad("head_refit_samples", "None or an integer >= 1")
        if self.loader_workers is not None and (isinstance(self.loader_workers, bool)
                                                or not isinstance(self.loader_workers, int) or self.loader_workers < 0):
            bad("loader_workers", "None or an integer >= 0")

    @property
    def step_size(self) -> float:
        """alpha, with the default filled in."""
        if self.alpha is not None:
            return float(self.alpha)
        return float(self.eps) if self.steps == 1 else 2.5 * float(self.eps) / self.steps

    @property
    def deterministic_search(self) -> bool:
        """True when every redo of the search gives the same labels."""
        if self.compat == "authors" and self.lamda > 0 and self.lamda_schedule != "constant":
            return False  # their lambda changes every iteration, so each epoch searches anew
        return self.gamma == 0 and not self.random_start

    @property
    def refresh_mode(self) -> str:
        """refresh with "auto" resolved: once when the search is deterministic."""
        if self.refresh != "auto":
            return self.refresh
        return "once" if self.deterministic_search else "epoch"

    @classmethod
    def recommended(cls, *, forget_size: Optional[int] = None, remain_size: Optional[int] = None,
                    **overrides) -> "UnlearnConfig":
        """Settings that come close to a retrained model in one run, without a validation split.

        The plain defaults stay the paper's; this is the recipe that bench/bench_recipe.py and
        bench/study_recipe.py found over the bundled data sets, several architectures and class /
        part-of-class / subgroup forgetting (their tables are in bench/RESULTS.md):

          relabel="nearest_incorrect"  every forget sample gets a wrong label, so the forget
                            accuracy falls in few steps;
          batchnorm="frozen"  the forget batches (one class, or one kind of image) would
                            otherwise rewrite the BatchNorm statistics the remain set needs;
                            this mattered more than any other knob;
          remain_reg=RECIPE_REMAIN_REG, remain_target="labels", lr=RECIPE_LR  a moderate remain
                            term at a small step: it holds the remain accuracy while the forget
                            loss moves the boundary; a stronger one (10) made the fine-tune of an
                            under-trained model collapse;
          epochs            the fine-tune needs a number of steps, not of epochs: with
                            forget_size, recipe_epochs(forget_size, batch_size) whole epochs, as
                            many as come nearest RECIPE_STEPS steps (an epoch is
                            ceil(forget_size / batch_size) of them), within RECIPE_EPOCHS (a
                            small forget set gets more epochs, a large one fewer); without it,
                            RECIPE_EPOCHS[0] + 2. Whole epochs: a partial last epoch that
                            leaves some forget samples one pass short cost a subgroup
                            (RetinaMNIST) 2-3 points of accuracy.
                            Fewer steps with a longer head re-fit cost less at equal quality
                            until the fine-tune stops removing the class or the remain
                            accuracy drops; a larger step (lr 1e-3) made it collapse;
          head_refit_epochs=RECIPE_HEAD_REFIT_EPOCHS, head_refit_samples=RECIPE_HEAD_REFIT_SAMPLES
                            then the classifier head alone is re-trained on a seeded subset of
                            the remain set and the relabelled forget images of whole classes
                            forgotten (head_refit.gone_classes), on features computed
                            once (fastunlearn.head_refit): the fine-tune leaves the head tilted
                            against the remain classes, and this brings their accuracy back for
                            one forward pass over the subset. Needs the remain set.

        Part of a class is not this recipe's job: a retrained model still recognises most of
        those images, and the recipe drives their accuracy to zero; use fu.sweep with heldout=.

        remain_size is accepted for symmetry and checked; the recipe does not depend on it
        (the remain term reads one remain batch per forget batch, whatever its size).
        overrides: any field, applied last (so epochs=... wins over the rule).
        """
        for name, v in (("forget_size", forget_size), ("remain_size", remain_size)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"UnlearnConfig.recommended: {name} must be None or an integer >= 1, got {v!r}")
        batch = overrides.get("batch_size", cls.batch_size)
        epochs = RECIPE_EPOCHS[0] + 2
        if forget_size is not None and isinstance(batch, int) and batch >= 1:
            epochs = recipe_epochs(forget_size, batch)
        settings = dict(relabel="nearest_incorrect", batchnorm="frozen", remain_reg=RECIPE_REMAIN_REG,
                        remain_target="labels", lr=RECIPE_LR, epochs=epochs,
                        head_refit_epochs=RECIPE_HEAD_REFIT_EPOCHS, head_refit_samples=RECIPE_HEAD_REFIT_SAMPLES)
        settings.update(overrides)
        return cls(**settings)

    def replace(self, **changes) -> "UnlearnConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
