"""The paper's multiscale (MDEQ-style) networks: MNIST conv, SVHN / CIFAR-10 v1, CIFAR-10 small / large and
ImageNet small (the v2+ configs).

Every network is ``stem → multiscale DEQ layer → classification head``. Two block families exist because
the paper changed them between versions:

* **v1** (MNIST conv, SVHN, CIFAR-10 ``v1``): deqlab's [`ResidualBlock`][deqlab.nn.ResidualBlock] (GroupNorm + gelu,
  weight-normed convolutions, variational dropout), [`Downsample`][deqlab.nn.Downsample] /
  [`Upsample`][deqlab.nn.Upsample] mappings and [`PostFuse`][deqlab.nn.PostFuse] layers; head with gelu.
* **v2+** (CIFAR-10 ``small`` / ``large``, ImageNet ``small``): `BNResidualBlock` (BatchNorm + relu,
  as in the reference ``experiments/src/construct.jl``), stride-2 conv3×3 + BN + relu downsampling chains,
  conv3×3 + BN + relu + nearest-upsampling, conv1×1 + relu + BN post-fuse layers; head with relu.

BatchNorm *inside* the DEQ map always uses batch statistics (``track_running_stats=False``, the reference's
``track_stats=false``): the map is evaluated tens of times per forward, and running statistics updated at
every solver iteration would make ``f`` drift between iterations and leak solver state into eval mode.
The stem and head use ordinary BatchNorm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union, cast

import torch.nn.functional as F
from torch import Tensor, nn

from deqlab._compat import renamed
from deqlab.models._build import PaperNetwork, build_backward, build_solver, check_fields, make_multiscale
from deqlab.nn import Downsample, PostFuse, ResidualBlock, Upsample, VariationalHiddenDropout, WeightNorm
from deqlab.spec import BackwardSpec, ModelKind, ModelType, ODESolverName, SolverKind, SolverSpec, model_kind

__all__ = [
    "MDEQConfig",
    "build_mdeq",
    "Bottleneck",
    "BNResidualBlock",
    "ClassificationHead",
    "mnist_conv",
    "svhn_v1",
    "cifar10_v1",
    "cifar10_small",
    "cifar10_large",
    "imagenet_small",
]


@dataclass(frozen=True)
class MDEQConfig:
    """Everything that defines one multiscale paper network (every field can be overridden in
    [`deqlab.models.build_model`][deqlab.models.build_model]).

    Frozen: the module-level configs (``MNIST_CONV``, ``CIFAR10_SMALL``, ...) are shared; derive a variant
    with ``dataclasses.replace``. The fields without a default differ between the paper's networks, so
    each config states them; the defaults are the values most of the networks share.

    Attributes:
        version: ``"v1"`` or ``"v2"`` block family (see the module docstring).
        in_channels: channels of the input images.
        image_size: side of the (square) input images.
        num_channels: channels per scale; scale ``i`` has resolution ``image_size / 2**(downsample_times + i)``.
        expansion: width factor of the residual blocks' hidden convolution.
        dropout: variational hidden dropout in the residual blocks (mask fixed per solve).
        weight_norm: weight-normed residual (and v2 post-fuse) convolutions.
        num_groups: GroupNorm groups of the v1 residual blocks. Default 8.
        map_groups: GroupNorm groups of the v1 mappings between scales. Default 8.
        post_fuse_groups: GroupNorm groups of the v1 post-fuse layers. Default 4.
        post_fuse: whether the map has post-fuse layers. Default ``True``, as in every paper network but
            MNIST conv.
        head_channels: per-scale bottleneck widths of the head (each bottleneck outputs 4× as many).
        final_channels: width of the head's final 1×1 convolution.
        downsample_times: stride-2 convolutions in the stem (v2; 2 for ImageNet). Default 0: the 32×32
            and 28×28 images are small enough to solve at full resolution.
        shortcut_expansion: expansion of the Skip predictor's residual block. Default 5, as the v1 blocks.
        shortcut_groups: GroupNorm groups of the Skip predictor's residual block (v1). Default 8.
        num_classes: classifier outputs. Default 10 (every dataset but ImageNet).
        tol: forward solver tolerance (abs = rel); also the adjoint's.
        max_steps: forward solver step budget.
        mode: termination mode of the forward solver.
        discrete_mode: termination mode of the discrete (L-Broyden) solver when it differs from ``mode``.
            Default ``None``: ``mode``. MNIST conv sets ``rel_deq_best``: the paper gives ``rel_norm`` for
            its continuous solver only, and with ``rel_norm`` L-Broyden diverged on 2–19 % of the samples
            of the vanilla conv model on real MNIST (residuals up to 7e10 returned as z*), which kept
            training at chance; the ``_best`` mode returns each sample's best iterate and trains (see
            ``paper_repro/results/README.md``). Overriding ``mode`` alone resets it, so ``mode=`` then
            applies to both solvers.
        backward_max_steps: GMRES VJP budget of the adjoint.
        ode_solver: the continuous solver's integrator: ``tsit5`` (the v1 experiments') or ``vcab3`` (the
            v2+ configs', as the paper states: one evaluation per step after start-up). Default ``tsit5``.
        reference_counting: the convention of ``solution.reference_nfe`` (see
            `deqlab.solvers.counting`): ``fastdeq`` for the v1 models (the January-2022 code ran them),
            ``deqjl`` (default) for the v2+ configs.
        compile_solver: each forward-solver iteration, and each Arnoldi step of the GMRES adjoint, as one
            compiled graph (`SolverSpec.compile`, `BackwardSpec.compile`;
            `docs/performance.md`). Default ``False``.
        solver_check_every: the forward solver's host checks every ``k`` steps (`SolverSpec.check_every`;
            with ``compile_solver``, the ``k`` steps one graph). Default 1.
        cuda_graphs: on CUDA, the forward solver's ``solver_check_every`` steps replayed as one CUDA graph
            (`SolverSpec.cuda_graphs`). Default ``False``.
        detach_skip_target: whether the skip loss treats z* as a detached target (``None``: detached for
            ``skip``, coupled for ``skip_reg``; see [`deqlab.nn.MapGuess`][deqlab.nn.MapGuess]).
        fuse_gain: initial affine weight γ of the v1 GroupNorms that end a path from the state back into
            the state: each residual block's last GroupNorm, the middle one of the blocks without injection
            (scales > 1), and each mapping's last GroupNorm (also the Skip predictor's output norms, so u0
            starts on the scale of z*). 1.0 is PyTorch's default. Why: a GroupNorm outputs unit variance
            whatever its input, so a path through one keeps gain ≈ 1 however small the N(0, 0.01) convolution
            weights are (a GroupNorm of a z-only signal is scale-invariant in z; its Jacobian grows as 1/|z|).
            With γ = 1 the MNIST-conv map has Jacobian spectral radius ≈ 1.0 at init: fixed-point iteration
            ends at relative residual 2e-2 after 50 steps and limited-memory Broyden diverges (residuals
            1e5) on most samples. MNIST conv uses γ = 0.25: spectral radius ≈ 0.89 at init, every sample
            converges at the paper's tolerance (rel_norm 1e-2) in ≤ 15 evaluations; γ = 0.5 converged at
            init but Broyden diverged again within 60 training steps. No parameters are added; γ is
            trained as before.

    Raises:
        ValueError: when ``version`` is not ``v1`` / ``v2``, ``head_channels`` does not have one entry per
            scale, ``image_size`` is not divisible by the total downsampling, or ``fuse_gain`` <= 0.

    Examples:
        >>> import dataclasses
        >>> from deqlab.models.mdeq import MNIST_CONV
        >>> MNIST_CONV.scales  # (channels, height, width) per scale
        [(8, 28, 28), (16, 14, 14)]
        >>> dataclasses.replace(MNIST_CONV, image_size=29)
        Traceback (most recent call last):
        ...
        ValueError: MDEQConfig: image_size 29 must be divisible by 2 for 2 scales and 0 stem downsamplings
    """

    version: str
    in_channels: int
    image_size: int
    num_channels: Tuple[int, ...]
    expansion: int
    dropout: float
    weight_norm: bool
    head_channels: Tuple[int, ...]
    final_channels: int
    tol: float
    max_steps: int
    backward_max_steps: int
    mode: str
    num_classes: int = 10
    num_groups: int = 8
    map_groups: int = 8
    post_fuse: bool = True
    post_fuse_groups: int = 4
    downsample_times: int = 0
    shortcut_expansion: int = 5
    shortcut_groups: int = 8
    detach_skip_target: Optional[bool] = None
    fuse_gain: float = 1.0
    discrete_mode: Optional[str] = None
    ode_solver: str = "tsit5"
    reference_counting: str = "deqjl"
    compile_solver: bool = False
    solver_check_every: int = 1
    cuda_graphs: bool = False

    def solver_mode(self, solver: str) -> str:
        """The termination mode of the ``solver`` kind (``continuous`` or ``discrete``)."""
        return self.discrete_mode if solver == "discrete" and self.discrete_mode is not None else self.mode

    def solver_spec(self, kind: SolverKind) -> SolverSpec:
        """The forward solve for the solver ``kind``: ``tol``, ``max_steps``, the kind's mode, the
        ``ode_solver`` and the NFE counting convention of this config."""
        return SolverSpec(
            kind=kind,
            ode_solver=cast(ODESolverName, self.ode_solver),  # a plain string here; SolverSpec checks it
            tol=self.tol,
            max_steps=self.max_steps,
            mode=self.solver_mode(kind),
            reference_counting=self.reference_counting,
            compile=self.compile_solver,
            check_every=self.solver_check_every,
            cuda_graphs=self.cuda_graphs,
        )

    def backward_spec(self) -> BackwardSpec:
        """The GMRES adjoint within ``backward_max_steps`` VJPs, at the forward's tolerance."""
        return BackwardSpec(max_steps=self.backward_max_steps, compile=self.compile_solver)

    def __post_init__(self) -> None:
        if self.version not in ("v1", "v2"):
            raise ValueError(f"MDEQConfig: version must be 'v1' or 'v2', got {self.version!r}")
        if len(self.head_channels) != len(self.num_channels):
            raise ValueError(
                f"MDEQConfig: {len(self.num_channels)} scales need {len(self.num_channels)} "
                f"head_channels, got {len(self.head_channels)}"
            )
        size = self.image_size // 2 ** (self.downsample_times + len(self.num_channels) - 1)
        if size < 1 or self.image_size % 2 ** (self.downsample_times + len(self.num_channels) - 1):
            raise ValueError(
                f"MDEQConfig: image_size {self.image_size} must be divisible by "
                f"{2 ** (self.downsample_times + len(self.num_channels) - 1)} for "
                f"{len(self.num_channels)} scales and {self.downsample_times} stem downsamplings"
            )
        if not self.fuse_gain > 0:
            raise ValueError(f"MDEQConfig: fuse_gain must be > 0, got {self.fuse_gain}")

    @property
    def scales(self) -> List[Tuple[int, int, int]]:
        """``(channels, height, width)`` of each scale of the state, finest first."""
        s = self.image_size // 2**self.downsample_times
        return [(c, s // 2**i, s // 2**i) for i, c in enumerate(self.num_channels)]


# ------------------------------------------------------------------------------------------------ blocks
def _conv(
    cin: int,
    cout: int,
    k: int,
    *,
    stride: int = 1,
    bias: bool = False,
    std: Optional[float] = 0.01,
    weight_norm: bool = False,
) -> nn.Module:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
    if std is not None:
        nn.init.normal_(conv.weight, 0.0, std)
    return WeightNorm(conv) if weight_norm else conv


def _bn(c: int, *, track: bool = True) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, track_running_stats=track)


class BNResidualBlock(nn.Module):
    """The v2+ MDEQ block of the reference code (``ResidualBlock`` in ``experiments/src/construct.jl``).

    ``h = conv2(relu(BN1(conv1(z))))`` (conv3×3, C→eC→C, no bias, N(0, 0.01) init, optionally weight-normed);
    ``out = BN3(relu(BN2(dropout(h) + x) + h))``. The residual adds ``h`` (the reference's ``downsample`` is
    a no-op applied to the convolution output), not ``z``; we keep that so the model is the paper's.
    ``x`` is the injection (scale 1) or absent. All BatchNorms use batch statistics (see module docstring).

    Args:
        channels: channels ``C`` of the state at this scale (input and output).
        expansion: hidden width factor ``e``. Default 5, the reference block's.
        dropout: variational hidden dropout on ``h`` (one mask per solve). Default 0.0: off.
        weight_norm: weight-normalise both convolutions. Default ``False``, as the CIFAR-10 small config.

    Examples:
        >>> import torch
        >>> from deqlab.models.mdeq import BNResidualBlock
        >>> block = BNResidualBlock(4, expansion=2)
        >>> block(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(self, channels: int, expansion: int = 5, dropout: float = 0.0, weight_norm: bool = False):
        super().__init__()
        hidden = channels * expansion
        self.conv1 = _conv(channels, hidden, 3, weight_norm=weight_norm)
        self.bn1 = _bn(hidden, track=False)
        self.conv2 = _conv(hidden, channels, 3, weight_norm=weight_norm)
        self.dropout = VariationalHiddenDropout(dropout)
        self.bn2 = _bn(channels, track=False)
        self.bn3 = _bn(channels, track=False)

    def forward(self, z: Tensor, x: Optional[Tensor] = None) -> Tensor:
        h = self.conv2(F.relu(self.bn1(self.conv1(z))))
        y = self.dropout(h)
        if x is not None:
            y = y + x
        return self.bn3(F.relu(self.bn2(y) + h))


def _v2_down(cin: int, cout: int, levels: int) -> nn.Module:
    """i<j mapping: ``levels`` × (stride-2 conv3×3 + BN + relu); channels double per level when
    ``cout == cin·2^levels``, else stay ``cin`` until the last level."""
    layers: List[nn.Module] = []
    for i in range(1, levels + 1):
        a, b = (cin * 2 ** (i - 1), cin * 2**i) if cin * 2**levels == cout else (cin, cout if i == levels else cin)
        layers += [_conv(a, b, 3, stride=2), _bn(b, track=False), nn.ReLU()]
    return nn.Sequential(*layers)


def _v2_up(cin: int, cout: int, levels: int) -> nn.Module:
    """i>j mapping: one conv3×3 (cin→cout) + BN + relu, then nearest upsampling by ``2**levels``.

    One convolution, not a chain of per-level ones: with a chain (the later ``construct.jl``) CIFAR-10 large
    and ImageNet small have 0.59M parameters more than the paper reports (11.22M / 18.50M vs 10.63M /
    17.91M); with one convolution both match (10.633M / 17.913M)."""
    return nn.Sequential(
        _conv(cin, cout, 3), _bn(cout, track=False), nn.ReLU(), nn.Upsample(scale_factor=2**levels, mode="nearest")
    )


class _V2PostFuse(nn.Module):
    """conv1×1 (optionally weight-normed) → relu → BN."""

    def __init__(self, channels: int, weight_norm: bool):
        super().__init__()
        self.conv = _conv(channels, channels, 1, weight_norm=weight_norm)
        self.bn = _bn(channels, track=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(F.relu(self.conv(x)))


class Bottleneck(nn.Module):
    """ResNet bottleneck ``in → planes → planes → 4·planes`` (conv1×1, conv3×3, conv1×1, each with BN;
    ``act`` between), plus a conv1×1 + BN rescale of the input when ``in != 4·planes``; ``act`` at the end.

    Args:
        in_channels: channels of the input.
        planes: width of the two inner convolutions.
        act: the activation module (gelu for v1 heads, relu for v2+), shared by every position.
        expansion: output width factor. Default 4, ResNet's (the head's widths assume it).

    Examples:
        >>> import torch
        >>> from deqlab.models.mdeq import Bottleneck
        >>> Bottleneck(8, 2, torch.nn.ReLU())(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, in_channels: int, planes: int, act: nn.Module, expansion: int = 4):
        super().__init__()
        out = planes * expansion
        self.body = nn.Sequential(
            _conv(in_channels, planes, 1),
            _bn(planes),
            act,
            _conv(planes, planes, 3),
            _bn(planes),
            act,
            _conv(planes, out, 1),
            _bn(out),
        )
        self.rescale = nn.Sequential(_conv(in_channels, out, 1), _bn(out)) if in_channels != out else nn.Identity()
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.rescale(x))


class ClassificationHead(nn.Module):
    """Per-scale bottlenecks, pairwise fusion from fine to coarse (``y ← down_i(y) + bottleneck_{i+1}(z_{i+1})``
    with stride-2 conv3×3 + BN + act), conv1×1 → ``final_channels`` + BN + act, global mean pool, linear.

    Args:
        num_channels: channels of each scale of the state, finest first.
        head_channels: bottleneck width of each scale (outputs 4× as many); one entry per scale.
        final_channels: width of the final 1×1 convolution, the features the classifier sees.
        num_classes: outputs of the linear classifier.
        act: the activation module (gelu for v1, relu for v2+).

    Examples:
        >>> import torch
        >>> from deqlab.models.mdeq import ClassificationHead
        >>> head = ClassificationHead([4, 8], [2, 4], 16, 10, torch.nn.ReLU())
        >>> head([torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_channels: Sequence[int],
        head_channels: Sequence[int],
        final_channels: int,
        num_classes: int,
        act: nn.Module,
    ):
        super().__init__()
        self.bottlenecks = nn.ModuleList([Bottleneck(c, h, act) for c, h in zip(num_channels, head_channels)])
        self.downsamples = nn.ModuleList(
            [
                nn.Sequential(_conv(4 * a, 4 * b, 3, stride=2, bias=True), _bn(4 * b), act)
                for a, b in zip(head_channels[:-1], head_channels[1:])
            ]
        )
        self.final = nn.Sequential(_conv(4 * head_channels[-1], final_channels, 1, bias=True), _bn(final_channels), act)
        self.classifier = nn.Linear(final_channels, num_classes)

    def forward(self, z: Sequence[Tensor]) -> Tensor:
        y = self.bottlenecks[0](z[0])
        for down, block, zi in zip(self.downsamples, self.bottlenecks[1:], z[1:]):
            y = down(y) + block(zi)
        return self.classifier(self.final(y).mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------------ assembly
def _stem(cfg: MDEQConfig) -> nn.Module:
    c = cfg.num_channels[0]
    if cfg.version == "v1":  # 2 × (conv3×3 → BN → gelu), resolution kept
        return nn.Sequential(
            nn.Conv2d(cfg.in_channels, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.GELU(),
        )
    layers: List[nn.Module] = [
        _conv(cfg.in_channels, c, 3, stride=2 if cfg.downsample_times >= 1 else 1),
        _bn(c),
        nn.ReLU(),
        _conv(c, c, 3, stride=2 if cfg.downsample_times >= 2 else 1),
        _bn(c),
        nn.ReLU(),
    ]
    for _ in range(2, cfg.downsample_times):
        layers += [_conv(c, c, 3, stride=2), _bn(c), nn.ReLU()]
    if not (cfg.downsample_times == 0 and len(cfg.num_channels) <= 2):
        layers += [_conv(c, c, 1), _bn(c), nn.ReLU()]  # the reference's "stage0"
    return nn.Sequential(*layers)


def _set_output_gain(module: nn.Module, gain: float, *, injected: bool = True) -> nn.Module:
    """Initialise to ``gain`` the affine weight of the GroupNorms through which ``module`` feeds the state
    back into itself (see `MDEQConfig.fuse_gain`): a residual block's ``gn3``, and its ``gn2`` when the
    block gets no injection (``gn2`` then normalises a signal of ``z`` alone); a mapping's last GroupNorm."""
    if gain == 1.0:
        return module
    if isinstance(module, ResidualBlock):
        nn.init.constant_(module.gn3.weight, gain)
        if not injected:
            nn.init.constant_(module.gn2.weight, gain)
        return module
    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    if not norms:
        raise TypeError(f"fuse_gain: {type(module).__name__} has no GroupNorm to scale")
    nn.init.constant_(norms[-1].weight, gain)
    return module


def _map_layers(cfg: MDEQConfig):
    ch, n = cfg.num_channels, len(cfg.num_channels)
    if cfg.version == "v1":
        g = cfg.fuse_gain
        main = [
            _set_output_gain(
                ResidualBlock(
                    c,
                    expansion=cfg.expansion,
                    num_groups=cfg.num_groups,
                    dropout=cfg.dropout,
                    weight_norm=cfg.weight_norm,
                ),
                g,
                injected=i == 0,
            )
            for i, c in enumerate(ch)
        ]
        mapping = [
            [
                None
                if i == j
                else _set_output_gain(
                    Downsample(ch[i], ch[j], 2 ** (j - i), num_groups=cfg.map_groups)
                    if i < j
                    else Upsample(ch[i], ch[j], 2 ** (i - j), num_groups=cfg.map_groups),
                    g,
                )
                for j in range(n)
            ]
            for i in range(n)
        ]
        post: Optional[List[nn.Module]] = (
            [PostFuse(c, num_groups=cfg.post_fuse_groups) for c in ch] if cfg.post_fuse else None
        )
        return main, mapping, post
    main = [BNResidualBlock(c, cfg.expansion, cfg.dropout, cfg.weight_norm) for c in ch]
    mapping = [
        [
            None if i == j else (_v2_down(ch[i], ch[j], j - i) if i < j else _v2_up(ch[i], ch[j], i - j))
            for j in range(n)
        ]
        for i in range(n)
    ]
    post = [_V2PostFuse(c, cfg.weight_norm) for c in ch] if cfg.post_fuse else None
    return main, mapping, post


def _shortcut(cfg: MDEQConfig) -> List[nn.Module]:
    """The Skip predictor: one module per scale, each applied to the stem output (the layer's
    [`ShortcutGuess`][deqlab.nn.ShortcutGuess] applies them)."""
    ch = cfg.num_channels
    if cfg.version == "v1":
        g = cfg.fuse_gain
        first = _set_output_gain(
            ResidualBlock(
                ch[0], expansion=cfg.shortcut_expansion, num_groups=cfg.shortcut_groups, weight_norm=cfg.weight_norm
            ),
            g,
        )
        rest = [
            _set_output_gain(Downsample(ch[0], ch[i], 2**i, num_groups=cfg.map_groups), g) for i in range(1, len(ch))
        ]
    else:
        first = BNResidualBlock(ch[0], cfg.shortcut_expansion, 0.0, cfg.weight_norm)
        rest = [_v2_down(ch[0], ch[i], i) for i in range(1, len(ch))]
    return [first, *rest]


def build_mdeq(
    cfg: MDEQConfig,
    model_type: Union[ModelType, ModelKind] = "skip",
    solver: SolverKind = "discrete",
    *,
    jacobian_regularization: bool = False,
) -> PaperNetwork:
    """The multiscale network of ``cfg`` for one model type and solver kind.

    The factory functions (`mnist_conv`, `cifar10_small`, ...) call this with their config;
    call it directly with a config of your own.

    Args:
        cfg: the network's definition.
        model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode``. Default ``skip``, the paper's
            proposed model.
        solver: ``continuous`` (``cfg.ode_solver``) or ``discrete`` (limited-memory Broyden). Default
            ``discrete``, as [`deqlab.models.build_model`][deqlab.models.build_model]'s.
        jacobian_regularization: compute the Hutchinson Jacobian term. Default ``False``: it adds a VJP to
            every forward.

    Returns:
        The network, a [`PaperNetwork`][deqlab.models.PaperNetwork].

    Raises:
        ValueError: for an unknown ``solver``, or ``neural_ode`` with the discrete solver or Jacobian
            regularization.

    Examples:
        >>> import dataclasses
        >>> from deqlab.models import count_parameters
        >>> from deqlab.models.mdeq import MNIST_CONV, build_mdeq
        >>> cfg = dataclasses.replace(MNIST_CONV, num_channels=(4, 8), head_channels=(2, 4), final_channels=8)
        >>> count_parameters(build_mdeq(cfg, "vanilla"))
        10010
    """
    kind = model_kind(model_type)
    solver_obj = build_solver(cfg.solver_spec(solver))
    main, mapping, post = _map_layers(cfg)
    deq = make_multiscale(
        kind,
        main,
        mapping,
        post,
        solver_obj,
        cfg.scales,
        shortcut=_shortcut(cfg) if kind.shortcut else None,
        backward=build_backward(cfg.backward_spec()),
        jacobian_regularization=jacobian_regularization,
        detach_skip_target=cfg.detach_skip_target,
    )
    act = nn.GELU() if cfg.version == "v1" else nn.ReLU()
    head = ClassificationHead(cfg.num_channels, cfg.head_channels, cfg.final_channels, cfg.num_classes, act)
    return PaperNetwork(_stem(cfg), deq, head, model_type=kind, solver_kind=solver)


# ------------------------------------------------------------------------------------------------ configs
MNIST_CONV = MDEQConfig(
    version="v1",
    in_channels=1,
    image_size=28,
    num_channels=(8, 16),
    expansion=5,
    dropout=0.0,
    weight_norm=True,
    num_groups=4,
    map_groups=8,
    post_fuse=False,
    head_channels=(8, 16),
    final_channels=200,
    tol=1e-2,
    max_steps=50,
    backward_max_steps=15,
    mode="rel_norm",
    shortcut_expansion=5,
    shortcut_groups=4,
    fuse_gain=0.25,
    discrete_mode="rel_deq_best",
    reference_counting="fastdeq",
)
CIFAR10_V1 = MDEQConfig(
    version="v1",
    in_channels=3,
    image_size=32,
    num_channels=(24, 24),
    expansion=5,
    dropout=0.25,
    weight_norm=True,
    num_groups=8,
    map_groups=8,
    post_fuse=True,
    post_fuse_groups=4,
    head_channels=(8, 16),
    final_channels=200,
    tol=5e-2,
    max_steps=20,
    backward_max_steps=15,
    mode="rel_deq_best",
    shortcut_expansion=5,
    shortcut_groups=8,
    reference_counting="fastdeq",
)
SVHN_V1 = CIFAR10_V1
CIFAR10_SMALL = MDEQConfig(
    version="v2",
    ode_solver="vcab3",
    in_channels=3,
    image_size=32,
    num_channels=(24, 24),
    expansion=5,
    dropout=0.2,
    weight_norm=False,
    head_channels=(8, 16),
    final_channels=200,
    tol=5e-2,
    max_steps=18,
    backward_max_steps=20,
    mode="rel_norm",
    shortcut_expansion=3,
)
CIFAR10_LARGE = MDEQConfig(
    version="v2",
    ode_solver="vcab3",
    in_channels=3,
    image_size=32,
    num_channels=(32, 64, 128, 256),
    expansion=4,
    dropout=0.3,
    weight_norm=True,
    head_channels=(14, 28, 56, 112),
    final_channels=1680,
    tol=5e-2,
    max_steps=18,
    backward_max_steps=20,
    mode="rel_deq_best",
    shortcut_expansion=3,
)
IMAGENET_SMALL = MDEQConfig(
    version="v2",
    ode_solver="vcab3",
    in_channels=3,
    image_size=224,
    num_channels=(32, 64, 128, 256),
    expansion=5,
    dropout=0.0,
    weight_norm=True,
    head_channels=(24, 48, 96, 192),
    final_channels=2048,
    tol=5e-2,
    max_steps=27,
    backward_max_steps=28,
    mode="abs_deq_best",
    downsample_times=2,
    num_classes=1000,
    shortcut_expansion=3,
)


_FACTORY_SECTIONS = """

``overrides`` replace fields of `MDEQConfig`.

Args:
    model_type: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode``. Default ``skip``, the paper's proposed
        model.
    solver: ``continuous`` (the config's ``ode_solver``) or ``discrete`` (limited-memory Broyden). Default
        ``discrete``, as [`deqlab.models.build_model`][deqlab.models.build_model]'s.
    jacobian_regularization: compute the Hutchinson Jacobian term. Default ``None``: ``False`` (it adds a
        VJP to every forward).
    jac_reg: deprecated old name of ``jacobian_regularization`` (warns ``DeprecationWarning``).
    **overrides: fields of `MDEQConfig` to change (``tol``, ``max_steps``, ``num_channels``, ...).

Returns:
    The network, a [`PaperNetwork`][deqlab.models.PaperNetwork].

Raises:
    TypeError: for an ``overrides`` name that is not an `MDEQConfig` field.
    ValueError: when the overridden config is invalid, for an unknown ``solver``, or ``neural_ode`` with the
        discrete solver or Jacobian regularization.

Examples:
    >>> from deqlab.models import count_parameters
    >>> from deqlab.models.mdeq import {name}
    >>> count_parameters({name}("vanilla"))
    {params}
"""


def _factory(name: str, base: MDEQConfig, doc: str, params: int):
    def build(
        model_type: ModelType = "skip",
        solver: SolverKind = "discrete",
        *,
        jacobian_regularization: Optional[bool] = None,
        jac_reg: Optional[bool] = None,
        **overrides: Any,
    ) -> PaperNetwork:
        jr = bool(renamed(name, "jacobian_regularization", jacobian_regularization, "jac_reg", jac_reg, False))
        check_fields(name, overrides, [f.name for f in dataclasses.fields(MDEQConfig)])
        for key in ("num_channels", "head_channels"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        if "mode" in overrides and "discrete_mode" not in overrides:
            overrides["discrete_mode"] = None  # mode= names the stop rule of both solvers
        return build_mdeq(dataclasses.replace(base, **overrides), model_type, solver, jacobian_regularization=jr)

    build.__doc__ = doc + _FACTORY_SECTIONS.format(name=name, params=params)
    build.__name__ = build.__qualname__ = name
    build.config = base  # type: ignore[attr-defined]  # the defaults, readable without building a network
    return build


mnist_conv = _factory(
    "mnist_conv", MNIST_CONV, "MNIST conv (v1): 2-scale MDEQ, 28×28×8 and 14×14×16, tol 1e-2, 50 steps.", 71578
)
svhn_v1 = _factory(
    "svhn_v1", SVHN_V1, "SVHN (v1): the CIFAR-10 v1 model (2 scales of 24 channels, dropout 0.25).", 159274
)
cifar10_v1 = _factory(
    "cifar10_v1", CIFAR10_V1, "CIFAR-10 (v1): 2 scales 32×32×24 / 16×16×24, dropout 0.25, tol 5e-2, 20 steps.", 159274
)
cifar10_small = _factory(
    "cifar10_small",
    CIFAR10_SMALL,
    "CIFAR-10 small / tiny (v2+): 2 scales of 24 channels, ≈164K parameters (vanilla; ≈200K with the Skip predictor).",
    163546,
)
cifar10_large = _factory(
    "cifar10_large", CIFAR10_LARGE, "CIFAR-10 large (v2+): 4 scales (32, 64, 128, 256), ≈10.6M parameters.", 10631958
)
imagenet_small = _factory(
    "imagenet_small",
    IMAGENET_SMALL,
    "ImageNet small (v2+): 4 scales, 224² input downsampled 4×, ≈17.9M parameters.",
    17912456,
)
