"""Models and layers of every recipe: shapes, conditioning, spectral norm, attention, mbstd, hierarchical z, AMP."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from src.config import RECIPES, make_config
from src.layers import (DiscriminatorHead, MinibatchStdDev, PixelNorm, SelfAttention2d, SpectralNormFp32, sn_conv2d,
                        spectral_norm_layers, spectral_norm_power_iteration_, with_sn)
from src.models import build_models, count_params, describe_models, hier_z_sizes


N_CLASSES = 10
BATCH = 4
_BUILT = {}


def tiny_models(recipe: str, **overrides):
    """(cfg, G, D) for a recipe at width 8, built once per test session for the same arguments."""
    key = (recipe, tuple(sorted(overrides.items())))
    if key not in _BUILT:
        torch.manual_seed(0)
        cfg = make_config({"recipe": recipe, "g_ch": 8, "d_ch": 8, **overrides})
        _BUILT[key] = (cfg, *build_models(cfg, N_CLASSES))
    return _BUILT[key]


def inputs(cfg, seed=1):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(BATCH, cfg.z_dim, generator=gen)
    y = torch.randint(0, N_CLASSES, (BATCH,), generator=gen)
    return z, y


def top_singular_value(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.detach().double(), ord=2))


# ---- every recipe -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_shapes_range_and_grads(recipe):
    cfg, G, D = tiny_models(recipe)
    G.train(), D.train()
    z, y = inputs(cfg)
    img = G(z, y)
    assert img.shape == (BATCH, 3, 64, 64)
    assert img.min() >= -1 and img.max() <= 1
    assert G.z_dim == cfg.z_dim and G.n_classes == N_CLASSES
    adv_logit, class_logits = D(img, y)
    assert adv_logit.shape == (BATCH,)
    if cfg.cond == "acgan":
        assert class_logits.shape == (BATCH, N_CLASSES)
    else:
        assert class_logits is None
    G.zero_grad(), D.zero_grad()
    loss = adv_logit.sum() + (class_logits.logsumexp(1).sum() if class_logits is not None else 0)
    loss.backward()
    for model in (G, D):
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{recipe}: {type(model).__name__}.{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{recipe}: {type(model).__name__}.{name} has a non-finite gradient"
        assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_conditioning_changes_g_output_only_when_conditional(recipe):
    cfg, G, _ = tiny_models(recipe)
    G = copy.deepcopy(G).eval()
    # SNGAN-style per-layer class embeddings start at zero (all classes equal), as training would move them
    with torch.no_grad():
        for name, p in G.named_parameters():
            if "gain_embed" in name or "bias_embed" in name:
                p.normal_(0, 0.5)
    z, y = inputs(cfg)
    with torch.no_grad():
        out_a = G(z, y)
        out_b = G(z, (y + 1) % N_CLASSES)
    if cfg.cond == "none":
        assert torch.equal(out_a, out_b)
    else:  # relative: eval-mode DCGAN outputs are tiny at N(0, 0.02) init
        assert (out_a - out_b).abs().max() > 1e-2 * out_a.abs().max()


@pytest.mark.parametrize("recipe", [r for r in RECIPES if make_config({"recipe": r}).cond in ("projection", "concat")])
def test_label_conditioned_d_logit_changes_with_y(recipe):
    cfg, G, D = tiny_models(recipe)
    D = copy.deepcopy(D).eval()
    z, y = inputs(cfg)
    with torch.no_grad():
        img = torch.rand(BATCH, 3, 64, 64) * 2 - 1
        logit = D(img, y)[0]
        assert torch.equal(D(img, y)[0], logit)  # eval mode is deterministic: any change below comes from y
        # relative: eval-mode DCGAN logits are tiny at N(0, 0.02) init
        assert (logit - D(img, (y + 1) % N_CLASSES)[0]).abs().max() > 1e-3 * logit.abs().max()


def test_projection_head_adds_inner_product_of_embedding_and_features():
    head = DiscriminatorHead(feat_dim=3, n_classes=2, cond="projection", sn=False)
    with torch.no_grad():
        head.adv.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        head.adv.bias.zero_()
        head.proj.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]))
    h = torch.tensor([[1.0, 2.0, 3.0]])
    # adv = h . w + h . embed(y): y=0 -> 1 + 2, y=1 -> 1 + 6
    assert head(h, torch.tensor([0]))[0].item() == pytest.approx(3.0)
    assert head(h, torch.tensor([1]))[0].item() == pytest.approx(7.0)


def test_acgan_d_adv_logit_ignores_labels():
    cfg, G, D = tiny_models("acgan")
    z, y = inputs(cfg)
    D = copy.deepcopy(D).eval()
    with torch.no_grad():
        img = torch.rand(BATCH, 3, 64, 64) * 2 - 1
        assert torch.equal(D(img, y)[0], D(img, None)[0])


@pytest.mark.parametrize("arch,cond", [("resnet", "acgan"), ("resnet", "concat"), ("resnet", "none"),
                                       ("dcgan", "projection")])
def test_other_arch_cond_combinations_with_attention_and_mbstd(arch, cond):
    extra = {} if arch == "resnet" else {"shared_dim": 0, "hier_z": False}
    cfg, G, D = tiny_models("biggan", arch=arch, cond=cond, attn_res=16, mbstd=True, **extra)
    assert any(isinstance(m, SelfAttention2d) for m in G.modules())
    assert any(isinstance(m, SelfAttention2d) for m in D.modules())
    z, y = inputs(cfg)
    adv_logit, class_logits = D(G(z, y), y)
    assert adv_logit.shape == (BATCH,) and torch.isfinite(adv_logit).all()
    assert (class_logits is not None) == (cond == "acgan")


def test_dcgan_pixel_norm_generator():
    cfg, G, _ = tiny_models("dcgan", pixel_norm=True)
    assert any(isinstance(m, PixelNorm) for m in G.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in G.modules())
    img = G(*inputs(cfg))
    assert img.shape == (BATCH, 3, 64, 64) and torch.isfinite(img).all()


def test_build_models_rejects_bad_settings_with_the_flag_name():
    with pytest.raises(ValueError, match="--attn-res"):
        build_models(make_config({"attn_res": 64, "g_ch": 8, "d_ch": 8}), N_CLASSES)
    with pytest.raises(ValueError, match="--pixel-norm"):
        build_models(make_config({"pixel_norm": True, "g_ch": 8, "d_ch": 8}), N_CLASSES)
    with pytest.raises(ValueError, match="--cond projection"):
        build_models(make_config({"g_ch": 8, "d_ch": 8}), 0)


def test_wrong_input_shapes_give_clear_errors():
    cfg, G, D = tiny_models("biggan")
    z, y = inputs(cfg)
    with pytest.raises(ValueError, match=r"z of shape \[B, 128\]"):
        G(z[:, :100], y)
    with pytest.raises(ValueError, match="labels y"):
        G(z, None)
    with pytest.raises(ValueError, match="64, 64"):
        D(torch.zeros(BATCH, 3, 32, 32), y)


# ---- initialisation and bookkeeping ---------------------------------------------------------------------------
def test_initialisation_schemes():
    _, G, _ = tiny_models("biggan")
    stem = G.stem.parametrizations.weight.original.detach()  # [4*4*16ch, z chunk]: orthonormal columns
    assert torch.allclose(stem.t() @ stem, torch.eye(stem.shape[1]), atol=1e-4)
    _, G_dc, D_dc = tiny_models("dcgan")
    conv_w = D_dc.blocks[2].conv.weight.detach()
    assert abs(conv_w.std().item() - 0.02) < 0.003 and abs(conv_w.mean().item()) < 0.003


def test_count_params_and_description():
    assert count_params(nn.Linear(3, 2)) == 8
    assert count_params(with_sn(nn.Linear(3, 2))) == 8  # u, v are buffers
    _, G, D = tiny_models("biggan")
    line = describe_models(G, D)
    assert "\n" not in line and "ResNetGenerator" in line and "ResNetDiscriminator" in line
    assert f"{count_params(G) / 1e6:.2f}M" in line


def test_state_dict_round_trip_and_deepcopy():
    cfg, G, _ = tiny_models("biggan")
    z, y = inputs(cfg)
    torch.manual_seed(5)
    G2, _ = build_models(cfg, N_CLASSES)
    G2.load_state_dict(G.state_dict())
    G_ema = copy.deepcopy(G)
    G.eval(), G2.eval(), G_ema.eval()
    with torch.no_grad():
        assert torch.equal(G(z, y), G2(z, y))
        assert torch.equal(G(z, y), G_ema(z, y))
    G.train()
    assert any(k.endswith("parametrizations.weight.0.u") for k in G.state_dict())


# ---- layers ---------------------------------------------------------------------------------------------------
def test_spectral_norm_top_singular_value_is_one():
    torch.manual_seed(0)
    conv = sn_conv2d(6, 16, 3, padding=1, sn=True)
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(7.0)  # far from 1 before normalising
    for _ in range(30):
        spectral_norm_power_iteration_(spectral_norm_layers(conv))  # one power iteration per optimiser step
    assert top_singular_value(conv.parametrizations.weight.original.flatten(1)) > 3
    assert top_singular_value(conv.weight.flatten(1)) == pytest.approx(1.0, abs=0.02)
    deconv = with_sn(nn.ConvTranspose2d(8, 4, 4, 2, 1))
    for _ in range(30):
        spectral_norm_power_iteration_(spectral_norm_layers(deconv))
    # ConvTranspose weight is [in, out, k, k]: SN normalises the [out, in*k*k] matrix
    assert top_singular_value(deconv.weight.movedim(1, 0).flatten(1)) == pytest.approx(1.0, abs=0.02)


def test_spectral_norm_forward_only_reads_u_v_and_stays_fp32_under_autocast():
    conv = sn_conv2d(4, 8, 3, padding=1)
    sn = conv.parametrizations.weight[0]
    assert isinstance(sn, SpectralNormFp32)
    u_before = sn.u.clone()
    for mode in (False, True):
        conv.train(mode)
        conv(torch.randn(1, 4, 5, 5))
        assert torch.equal(sn.u, u_before)  # forwards never move u: two D forwards before a backward stay valid
    spectral_norm_power_iteration_(spectral_norm_layers(conv))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(torch.randn(1, 4, 5, 5))
        w_autocast = conv.weight
    assert out.dtype == torch.bfloat16  # the conv itself runs in bf16
    assert w_autocast.dtype == torch.float32 and sn.u.dtype == torch.float32
    assert not torch.equal(sn.u, u_before)
    # the autocast weight is W / sigma with sigma = u^T W v computed in fp32
    original = conv.parametrizations.weight.original.detach().flatten(1)
    sigma = sn.u @ original @ sn.v
    assert torch.allclose(w_autocast.detach().flatten(1), original / sigma, rtol=1e-6, atol=1e-7)


def test_self_attention_identity_at_init_and_matches_a_hand_computation():
    torch.manual_seed(0)
    attn = SelfAttention2d(16, sn=False)
    x = torch.randn(2, 16, 8, 8)
    out = attn(x)
    assert out.shape == x.shape and torch.equal(out, x)  # gamma = 0
    with torch.no_grad():
        attn.gamma.fill_(0.5)
    out = attn(x)
    # reference: beta[i, j] = softmax_j(theta_i . phi_j) over the 2x2-max-pooled positions j
    theta = torch.einsum("oc,bchw->bohw", attn.theta.weight[:, :, 0, 0], x).flatten(2)
    phi = nn.functional.max_pool2d(torch.einsum("oc,bchw->bohw", attn.phi.weight[:, :, 0, 0], x), 2).flatten(2)
    g = nn.functional.max_pool2d(torch.einsum("oc,bchw->bohw", attn.g.weight[:, :, 0, 0], x), 2).flatten(2)
    beta = torch.softmax(torch.einsum("bci,bcj->bij", theta, phi), dim=2)
    attended = torch.einsum("bcj,bij->bci", g, beta).reshape(2, 8, 8, 8)
    expected = x + 0.5 * torch.einsum("oc,bchw->bohw", attn.o.weight[:, :, 0, 0], attended)
    assert torch.allclose(out, expected, atol=1e-5)


def test_minibatch_stddev_matches_a_hand_computation():
    x = torch.arange(4 * 2 * 2 * 2, dtype=torch.float32).reshape(4, 2, 2, 2) ** 1.5
    out = MinibatchStdDev(group_size=4, eps=0.0)(x)
    assert out.shape == (4, 3, 2, 2)
    assert torch.equal(out[:, :2], x)
    expected = x.numpy().std(axis=0).mean()  # one group of 4: population std per feature, averaged
    assert torch.allclose(out[:, 2], torch.full((4, 2, 2), float(expected)), rtol=1e-5)
    # batch 6 with group size 4 -> groups of gcd(6, 4) = 2 samples: {0, 3}, {1, 4}, {2, 5}
    x6 = torch.randn(6, 3, 2, 2)
    out6 = MinibatchStdDev(group_size=4, eps=0.0)(x6)
    for i in range(6):
        pair = x6[[i % 3, i % 3 + 3]]
        assert out6[i, 3, 0, 0].item() == pytest.approx(pair.std(dim=0, unbiased=False).mean().item(), rel=1e-5)


def test_pixel_norm_gives_unit_mean_square():
    x = torch.randn(3, 16, 4, 4) * 5
    out = PixelNorm()(x)
    assert torch.allclose(out.pow(2).mean(dim=1), torch.ones(3, 4, 4), atol=1e-5)


def test_hierarchical_z_chunks():
    assert hier_z_sizes(128, 5) == [26, 26, 26, 25, 25]
    assert sum(hier_z_sizes(100, 5)) == 100
    with pytest.raises(ValueError, match="--z-dim"):
        hier_z_sizes(3, 5)
    cfg, G, _ = tiny_models("biggan")
    assert sum(G.z_sizes) == cfg.z_dim and len(G.z_sizes) == len(G.blocks) + 1
    G = copy.deepcopy(G).eval()
    z, y = inputs(cfg)
    z_last = z.clone()
    z_last[:, -G.z_sizes[-1]:] += 1.0  # only the last block's chunk changes
    with torch.no_grad():
        assert (G(z, y) - G(z_last, y)).abs().max() > 1e-4


# ---- speed paths --------------------------------------------------------------------------------------------
def test_bf16_autocast_forward_of_the_default_recipe_is_finite():
    cfg, G, D = tiny_models("biggan")
    z, y = inputs(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = G(z, y)
        adv_logit, _ = D(img, y)
    assert torch.isfinite(img.float()).all() and torch.isfinite(adv_logit.float()).all()
    assert math.isfinite(adv_logit.float().sum().item())


@pytest.mark.parametrize("recipe", ["biggan", "acgan"])
def test_channels_last_gives_the_same_outputs(recipe):
    cfg, G, D = tiny_models(recipe)
    z, y = inputs(cfg)
    G_cl = copy.deepcopy(G).eval().to(memory_format=torch.channels_last)
    D_cl = copy.deepcopy(D).eval().to(memory_format=torch.channels_last)
    G_ref, D_ref = copy.deepcopy(G).eval(), copy.deepcopy(D).eval()
    with torch.no_grad():
        img = G_ref(z, y)
        img_cl = G_cl(z, y)
        assert torch.allclose(img, img_cl, atol=1e-5)
        adv_ref = D_ref(img, y)[0]
        adv_cl = D_cl(img.contiguous(memory_format=torch.channels_last), y)[0]
    assert torch.allclose(adv_ref, adv_cl, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["dcgan", "cgan", "acgan"])
def test_draw_res_32_draws_a_quarter_and_d_judges_what_was_drawn(recipe):
    """G draws 32x32 and its images are that drawing upsampled bilinearly to 64x64; D judges 32x32 (a 64x64 image
    2x2-averaged first); ~4x fewer FLOPs."""
    cfg, G, D = tiny_models(recipe, draw_res=32)
    z, y = inputs(cfg)
    with torch.no_grad():
        img = G.eval()(z, y)
        # training takes the drawing itself (full_res=False) and D judges it without the 64x64 round trip
        drawn = G(z, y, full_res=False)
        assert img.shape == (BATCH, 3, 64, 64) and drawn.shape == (BATCH, 3, 32, 32)
        # by hand, bilinear x2 (pixel centres): output row 2i+1 = 0.75 row i + 0.25 row i+1, row 2i = 0.25 row i-1
        # + 0.75 row i; the same along columns. Pixel (3, 2) from drawn rows 1..2 and columns 0..1:
        rows = 0.75 * drawn[:, :, 1, :] + 0.25 * drawn[:, :, 2, :]
        assert torch.allclose(img[:, :, 3, 2], 0.25 * rows[:, :, 0] + 0.75 * rows[:, :, 1], atol=1e-6)
        # not 2x2 repeats: neighbouring output pixels of one drawn pixel differ
        assert not torch.equal(img[:, :, 2::2, :], img[:, :, 3::2, :])
        assert D(img, y)[0].shape == (BATCH,) and D.eval()(drawn, y)[0].shape == (BATCH,)
        assert torch.equal(D.fit_real(img), torch.nn.functional.avg_pool2d(img, 2))
        with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\] or \[B, 3, 32, 32\], got \[4, 3, 16, 16\]"):
            D(img[:, :, :16, :16], y)
    _, G64, D64 = tiny_models(recipe)
    # one block fewer on each side: the 64x64 models have every layer of the 32x32 ones plus one
    assert len(G.blocks) == len(G64.blocks) - 1 and len(D.blocks) == len(D64.blocks) - 1


def test_draw_res_32_is_refused_for_the_resnet_models():
    with pytest.raises(ValueError, match="--draw-res 32 is a DCGAN option"):
        build_models(make_config({"draw_res": 32}), N_CLASSES)
