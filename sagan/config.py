"""The configuration schema. Registered in Hydra's ConfigStore so that a misspelt or mistyped key fails at once.

conf/*.yaml fill in values (presets, datasets, experiments); these dataclasses say which keys exist and their types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from sagan.models.attention_types import check_attention
from sagan.models.discriminator import D_SHORTCUTS
from sagan.models.layers import COND_BN_FORMS, SN_UPDATES
from sagan.utils.errors import UserError


# Choices of settings that the config checks here and the modules that use them check again: one constant each.
EMA_BN = ("standing", "copy")  # optim.ema_bn: where G_ema's BatchNorm statistics come from (sagan.training.ema)
AUGMENTS = ("none", "diffaugment")  # data.augment
AUGMENT_POLICIES = ("color", "translation", "cutout")  # data.augment_policy: DiffAugment's operations
PRECISIONS = ("fp32", "bf16", "fp16")  # perf.precision, besides auto (sagan.training.step)


def check_policy(policy: Any) -> None:
    unknown = [p for p in policy if p not in AUGMENT_POLICIES]
    if unknown or not policy:
        raise UserError(
            f"data.augment_policy {list(policy)} is not a non-empty list of {', '.join(AUGMENT_POLICIES)}: "
            "e.g. data.augment_policy=[color,translation,cutout]"
        )


@dataclass
class ModelConfig:
    name: str = "sagan32"
    resolution: int = 32
    z_dim: int = 128
    g_ch: int = 64
    d_ch: int = 64
    g_attn: list[int] = field(default_factory=lambda: [16])  # feature-map sizes that get self-attention
    d_attn: list[int] = field(default_factory=lambda: [16])
    attn_pool: int = 2  # max-pool of keys/values; 1 = none
    # The layer at those sizes: sagan (the paper's block) | multihead | simple (no pooling, no output conv, value C) |
    # local (a window of attn_window, relative positions) | se (squeeze-excitation) | cbam | residual (the control)
    attn_type: str = "sagan"
    attn_heads: int = 1  # multihead: heads the C/8 query/key and C/2 value widths are split into
    attn_window: int = 7  # local: the side of the neighbourhood each position attends to (odd)
    g_sn: bool = True  # spectral norm in G: false runs the paper's ablation
    d_sn: bool = True
    init: str = "xavier"  # xavier (official) | orthogonal (BigGAN) | normal (N(0, 0.02))
    conditional: bool = False  # class-conditional G (cBN) and D (projection); needs labelled data
    # G's BatchNorm momentum (PyTorch's convention: running = (1 - m) running + m batch). 0.1 is PyTorch's and
    # BigGAN's default; the official TF code uses decay 0.999 (m = 0.001) in its conditional BNs, 0.9999 in the last.
    bn_momentum: float = 0.1
    # What StudioGAN's networks do differently (conf/model/studiogan*.yaml sets them; README "Differences from
    # StudioGAN"). The defaults are the official code's.
    bn_eps: float = 1e-5  # G's BatchNorm epsilon (StudioGAN: 1e-4)
    cond_bn: str = "tables"  # tables: per-class gain and bias (official) | linear: 1 + SN-linear(onehot y) (StudioGAN)
    d_shortcut: str = "x"  # what D's blocks after the first feed their shortcut: x | relu (StudioGAN's relu(x))
    sn_update: str = "uv"  # power-iteration order: uv (PyTorch's parametrization) | vu (official TF code, StudioGAN)
    g_widths: Optional[list[int]] = None  # G's width multipliers of g_ch at 4x4 ... resolution; default per resolution


@dataclass
class DataConfig:
    name: str = "cifar10"  # cifar10 | cifar100 | stl10 | celeba | folder | demo
    root: Optional[str] = None  # dataset folder (torchvision) or a folder / .zip of images (folder)
    download: bool = True  # torchvision datasets: download on first use
    split: str = "train"
    hflip: bool = True  # random horizontal flips
    in_memory: bool = False  # decode once into one tensor on the training device (small datasets)
    num_workers: Optional[int] = None  # data-loading processes; default: the CPUs this process may use, at most 8
    size: Optional[int] = None  # number of images of the generated demo set
    skip_bad: bool = False  # skip unreadable images instead of failing
    fraction: float = 1.0  # train on a seeded subset of this fraction (0.1: a tenth), the same in every run and rank
    augment: str = "none"  # none | diffaugment: differentiable augmentation of all D sees (real and fake, D and G steps)
    augment_policy: list[str] = field(default_factory=lambda: ["color", "translation", "cutout"])  # DiffAugment's ops


@dataclass
class LossConfig:
    name: str = "hinge"  # hinge | nonsaturating | wasserstein


@dataclass
class OptimConfig:
    # TTUR (paper, section 5): D learns 4x faster than G; beta1 = 0, beta2 = 0.9.
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    beta1: float = 0.0
    beta2: float = 0.9  # the paper's; the official code leaves TF's default 0.999
    eps: float = 1e-8  # Adam's epsilon
    n_dis: int = 1  # D steps per G step
    ema_decay: float = 0.9999  # 0: no averaging (G_ema is a copy of G)
    ema_start: int = 1000  # G steps before averaging starts (G_ema copies G until then)
    # G_ema's BatchNorm statistics: standing (re-estimated from G_ema's own samples, BigGAN) | copy (G's running ones)
    ema_bn: str = "standing"
    ema_bn_batches: int = 16  # batches of the training batch size that standing statistics average over
    # How a step runs the networks (the official code's way by default; StudioGAN's in experiment=cifar10_studiogan).
    d_calls: int = 1  # D forwards per D step: 1 (real and fake together) | 2 (real, then fake: two power iterations)
    d_sn_in_g_step: bool = False  # D's power iteration also runs in the G step (StudioGAN); false: D's u, v stay
    g_bn_stats_in_d_step: bool = True  # the D step's G forward updates G's BatchNorm running statistics (StudioGAN: no)


@dataclass
class LoggerConfig:
    mode: str = "offline"  # W&B: offline (default: no account needed, `wandb sync` later) | online | disabled
    project: str = "sagan"
    entity: Optional[str] = None
    name: Optional[str] = None  # W&B run name; default: experiment (or model) name and run directory time
    tags: list[str] = field(default_factory=list)
    log_every: int = 100  # steps between scalar logs (losses, lr, images/s, gamma, sigma) and progress updates
    image_every: int = 1000  # steps between sample grids and attention maps
    num_samples: int = 64  # images in each sample grid
    attn_images: int = 4  # images (rows) in each attention figure
    attn_queries: Optional[list[list[Any]]] = None  # (row, col): < 1 a fraction of the image, >= 1 a pixel
    gamma_warn_after: int = 2000  # warn if an attention gamma is still exactly 0 after this many steps


def arg(default: Any, help: str) -> Any:
    """A dataclass field with its one-line meaning, which the commands' --help prints."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class MetricsConfig:
    inception_weights: Optional[str] = arg(None, "local FID Inception weights (offline); default: torch-fidelity downloads them")
    cache_dir: Optional[str] = arg(None, "reference statistics cache; default $SAGAN_CACHE or ~/.cache/sagan/reference_stats")
    kid_subset_size: Optional[int] = arg(None, "KID subset size; default 1000, or half the smaller set below 2000 images")
    batch_size: int = arg(64, "images per Inception (and generator) batch")


@dataclass
class EvalConfig:
    every: int = 0  # steps between FID/IS evaluations of G_ema during training; 0 = never
    num_samples: int = 10_000  # generated images per evaluation
    ref_images: Optional[int] = None  # training images used as reference (a seeded subset); default all
    isc: bool = True  # also the Inception Score (skipped, with a warning, if the Inception weights cannot give it)


@dataclass
class PerfConfig:
    # null = auto: what is fast and safe on the device in use.
    # auto: bf16 on GPUs with native bf16 (Ampere and newer) and on CPUs with it (AVX512-BF16, AMX); fp16 with loss
    # scaling on older GPUs (V100, T4); else fp32 | fp32 | bf16 | fp16
    precision: str = "auto"
    channels_last: Optional[bool] = None  # NHWC activations; auto: with bf16 or fp16
    fused_adam: Optional[bool] = None  # one fused optimizer kernel; auto: on CUDA
    compile: bool = False  # torch.compile of G and D (minutes of compilation first)
    tf32: bool = True  # CUDA: TF32 matmuls/convs where fp32 remains
    cudnn_benchmark: bool = True  # CUDA: pick the fastest conv algorithms for the fixed shapes


@dataclass
class TrainConfig:
    steps: int = 100_000  # G steps
    batch_size: int = 64  # global: split over the processes, and over grad_accum micro-batches in each
    grad_accum: int = 1  # micro-batches per step and process, for a batch that does not fit at once
    seed: int = 0
    resume: Optional[str] = None  # auto: newest checkpoint of this run directory, or a checkpoint path
    init_from: Optional[str] = None  # a new run (step 0) from this checkpoint's G, D and G_ema (trained or imported)
    lock: bool = True  # hold a lock on the run directory: a second trainer on it stops (false: a filesystem without locks)
    freeze_d: int = 0  # fine-tuning: D's first k blocks keep the weights of train.init_from (FreezeD, Mo et al. 2020)
    ckpt_every: int = 2000
    keep_last: int = 3  # step-numbered checkpoints kept besides last.pt
    nan_rollbacks: int = 0  # on NaN/Inf: roll back to the last good checkpoint this many times (0: stop)
    nan_lr_factor: float = 0.5  # ... each time multiplying both learning rates by this


@dataclass
class DistConfig:
    # Several processes come from torchrun (`torchrun --nproc_per_node=8 -m sagan.train ...`); nothing to set here.
    sync_bn: bool = False  # G's BatchNorm statistics over the global batch instead of each process's share
    timeout_min: float = 30  # how long ranks wait for each other (rank 0 writes checkpoints, computes FID) before failing


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    experiment: Optional[str] = None  # name of the experiment preset, for the run name


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def check_config(cfg: Any, world_size: int = 1) -> None:
    """Reject impossible values before any work, one line each."""
    split = world_size * max(cfg.train.grad_accum, 1)
    rules = [
        (cfg.train.grad_accum >= 1, f"train.grad_accum must be >= 1, got {cfg.train.grad_accum}"),
        (
            cfg.train.batch_size % split == 0,
            f"train.batch_size={cfg.train.batch_size} does not split into {world_size} processes x "
            f"{cfg.train.grad_accum} micro-batches (train.grad_accum): use a multiple of {split}",
        ),
        (cfg.dist.timeout_min > 0, f"dist.timeout_min must be > 0, got {cfg.dist.timeout_min}"),
        (cfg.train.steps >= 0, f"train.steps must be >= 0, got {cfg.train.steps}"),
        (cfg.train.batch_size > 0, f"train.batch_size must be > 0, got {cfg.train.batch_size}"),
        (cfg.optim.lr_g > 0 and cfg.optim.lr_d > 0, f"learning rates must be > 0, got lr_g={cfg.optim.lr_g} lr_d={cfg.optim.lr_d}"),
        (0 <= cfg.optim.ema_decay < 1, f"optim.ema_decay must be in [0, 1), got {cfg.optim.ema_decay}"),
        (cfg.optim.n_dis >= 1, f"optim.n_dis must be >= 1, got {cfg.optim.n_dis}"),
        (cfg.optim.ema_bn in EMA_BN, f"unknown optim.ema_bn '{cfg.optim.ema_bn}': choose one of {', '.join(EMA_BN)}"),
        (cfg.perf.precision in ("auto", *PRECISIONS), f"unknown perf.precision '{cfg.perf.precision}': choose auto, {', '.join(PRECISIONS)}"),
        (cfg.optim.ema_bn_batches >= 1, f"optim.ema_bn_batches must be >= 1, got {cfg.optim.ema_bn_batches}"),
        (cfg.optim.eps > 0, f"optim.eps must be > 0, got {cfg.optim.eps}"),
        (0 <= cfg.model.bn_momentum <= 1, f"model.bn_momentum must be in [0, 1], got {cfg.model.bn_momentum}"),
        (cfg.model.bn_eps > 0, f"model.bn_eps must be > 0, got {cfg.model.bn_eps}"),
        (cfg.model.cond_bn in COND_BN_FORMS, f"unknown model.cond_bn '{cfg.model.cond_bn}': choose one of {', '.join(COND_BN_FORMS)}"),
        (cfg.model.d_shortcut in D_SHORTCUTS, f"unknown model.d_shortcut '{cfg.model.d_shortcut}': choose one of {', '.join(D_SHORTCUTS)}"),
        (cfg.model.sn_update in SN_UPDATES, f"unknown model.sn_update '{cfg.model.sn_update}': choose one of {', '.join(SN_UPDATES)}"),
        (cfg.optim.d_calls in (1, 2), f"optim.d_calls must be 1 or 2, got {cfg.optim.d_calls}"),
        (cfg.train.freeze_d >= 0, f"train.freeze_d must be >= 0 (D's blocks to keep fixed), got {cfg.train.freeze_d}"),
        (cfg.train.freeze_d == 0 or cfg.train.init_from is not None,
         f"train.freeze_d={cfg.train.freeze_d} keeps D's first blocks fixed, which means something only for weights "
         "from elsewhere: set train.init_from=<checkpoint> (untrained frozen blocks would stay random)"),
        (cfg.train.ckpt_every > 0, f"train.ckpt_every must be > 0, got {cfg.train.ckpt_every}"),
        (cfg.logger.image_every > 0, f"logger.image_every must be > 0, got {cfg.logger.image_every}"),
        (cfg.logger.num_samples > 0 and cfg.logger.attn_images > 0, "logger.num_samples and logger.attn_images must be > 0"),
        (cfg.train.keep_last >= 0, f"train.keep_last must be >= 0, got {cfg.train.keep_last}"),
        (cfg.train.nan_rollbacks >= 0, f"train.nan_rollbacks must be >= 0, got {cfg.train.nan_rollbacks}"),
        (0 < cfg.train.nan_lr_factor <= 1, f"train.nan_lr_factor must be in (0, 1], got {cfg.train.nan_lr_factor}"),
        (cfg.logger.log_every > 0, f"logger.log_every must be > 0, got {cfg.logger.log_every}"),
        (cfg.eval.every >= 0 and cfg.eval.num_samples > 1, "eval.every must be >= 0 and eval.num_samples > 1"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)
    check_attention(cfg.model.attn_type, cfg.model.attn_heads)
    if cfg.data.augment not in AUGMENTS:
        raise UserError(f"unknown data.augment '{cfg.data.augment}': choose one of {', '.join(AUGMENTS)}")
    check_policy(cfg.data.augment_policy)
    if not 0 < cfg.data.fraction <= 1:
        raise UserError(f"data.fraction must be in (0, 1], got {cfg.data.fraction}")
