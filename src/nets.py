"""What a run trains: G, D and G_ema with their optimisers and call paths, and the counters that go with them."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from src.compile_fallback import compile_or_eager
from src.config import Config
from src.distributed import DistInfo, wrap_ddp
from src.layers import spectral_norm_layers
from src.models import build_models
from src.precision import Precision, make_adam, make_grad_scaler, place_module


@dataclass
class LoopState:
    """Counters and adaptive settings of the loop; saved in the checkpoint as plain numbers."""
    step: int = 0
    images_seen: int = 0
    batch_size: int = 64         # global batch (all ranks together); an OOM halves it
    n_dis: int = 1               # current D steps per round (adaptive when dis_loss_limit > 0)
    lr_scale: float = 1.0        # halved by every NaN rollback
    rollbacks: int = 0
    schedule_progress: float = 0.0
    train_seconds: float = 0.0   # training wall-clock over all sessions


@dataclass
class GanNets:
    """The modules and optimisers of a run. G, D, G_ema are the plain modules (saved, EMA'd); G_train/D_train are
    the paths gradients flow through (DDP and/or compiled), G_fwd/D_fwd the same modules without DDP."""
    G: torch.nn.Module
    D: torch.nn.Module
    G_ema: torch.nn.Module
    G_train: torch.nn.Module
    D_train: torch.nn.Module
    G_fwd: torch.nn.Module
    D_fwd: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: object             # torch.amp.GradScaler (disabled unless fp16)
    scaler_d: object
    sn_G: list                   # spectral_norm_layers(G), (D): advanced once per optimiser step
    sn_D: list
    precision: Precision         # how the nets run on this device (autocast dtype, scaler, memory layout)


def build_gan_nets(cfg: Config, n_classes: int, device, precision: Precision, dist_info: DistInfo,
                   models: tuple | None = None) -> GanNets:
    """G, D (initialised by the models module, or the resumed checkpoint's `models`: G, D, G_ema), G_ema, the DDP /
    compiled call paths, Adam and grad scalers."""
    G, D, G_ema = models if models is not None else (*build_models(cfg, n_classes), None)
    G, D = place_module(G, device, precision).train(), place_module(D, device, precision).train()
    G_ema = copy.deepcopy(G) if G_ema is None else place_module(G_ema, device, precision)
    G_ema = G_ema.eval().requires_grad_(False)
    # Without DDP one (compiled) module serves both paths; with DDP the no-grad / frozen-D paths skip the wrapper.
    # A compile that fails on its first call runs eager instead, said in one line (the self-check's rounds find it).
    G_fwd = compile_or_eager(G, "G", torch.compile) if cfg.compile else G
    D_fwd = compile_or_eager(D, "D", torch.compile) if cfg.compile else D
    if dist_info.world_size > 1:
        G_train, D_train = wrap_ddp(G, dist_info), wrap_ddp(D, dist_info)
        if cfg.compile:
            G_train = compile_or_eager(G_train, "G (DDP)", torch.compile)
            D_train = compile_or_eager(D_train, "D (DDP)", torch.compile)
    else:
        G_train, D_train = G_fwd, D_fwd
    opt_g = make_adam(G.parameters(), cfg.lr_g, (cfg.beta1, cfg.beta2), precision)
    opt_d = make_adam(D.parameters(), cfg.lr_d, (cfg.beta1, cfg.beta2), precision)
    return GanNets(G=G, D=D, G_ema=G_ema, G_train=G_train, D_train=D_train, G_fwd=G_fwd, D_fwd=D_fwd,
                   opt_g=opt_g, opt_d=opt_d, scaler_g=make_grad_scaler(precision), scaler_d=make_grad_scaler(precision),
                   sn_G=spectral_norm_layers(G), sn_D=spectral_norm_layers(D), precision=precision)

