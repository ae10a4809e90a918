"""DiffAugment ops, policy parsing, flips and uint8 conversion."""
import pytest
import torch

from src.augment import (AUGMENT_FNS, diff_augment, parse_diffaug_policy, rand_brightness, rand_contrast, rand_cutout,
                         rand_saturation, rand_translation, random_flip, translate_images, uint8_to_unit)

FULL_POLICY = "color,translation,cutout"


def images(n=8, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_kept_and_empty_policy_is_identity():
    x = images()
    for policy in ("color", "translation", "cutout", FULL_POLICY, " color , cutout "):
        assert diff_augment(x, policy).shape == x.shape
    assert diff_augment(x, "") is x


def test_unknown_policy_lists_the_valid_names():
    with pytest.raises(ValueError, match="color, translation, cutout") as err:
        diff_augment(images(2), "color,zoom")
    assert "'zoom'" in str(err.value)
    assert parse_diffaug_policy("translation,color") == ["translation", "color"]


def test_translate_images_moves_a_hand_made_image():
    x = torch.zeros(2, 2, 5, 5)
    x[:, 0, 2, 2] = 1.0
    x[:, 1, 0, 4] = 2.0
    out = translate_images(x, torch.tensor([1, -1]), torch.tensor([-2, 0]))
    # image 0 moves 1 down, 2 left: (2, 2) -> (3, 0); (0, 4) -> (1, 2)
    expected0 = torch.zeros(2, 5, 5)
    expected0[0, 3, 0] = 1.0
    expected0[1, 1, 2] = 2.0
    assert torch.equal(out[0], expected0)
    # image 1 moves 1 up: (2, 2) -> (1, 2); (0, 4) leaves the image and the row it leaves is zero-filled
    expected1 = torch.zeros(2, 5, 5)
    expected1[0, 1, 2] = 1.0
    assert torch.equal(out[1], expected1)


def test_rand_translation_shifts_each_image_by_at_most_an_eighth():
    x = images(32, size=16) + 2.0  # strictly positive so the zero fill is visible; 1/8 of 16 = 2 pixels
    torch.manual_seed(0)
    out = rand_translation(x)
    torch.manual_seed(0)
    assert torch.equal(rand_translation(x), out)  # the global RNG makes it reproducible
    n = x.shape[0]
    matches = torch.zeros(n, dtype=torch.long)
    found = torch.zeros(n, 2, dtype=torch.long)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            moved = translate_images(x, torch.full((n,), dy), torch.full((n,), dx))
            hit = (moved == out).flatten(1).all(1)
            matches += hit
            found[hit] = torch.tensor([dy, dx])
    assert (matches == 1).all(), "every image must be exactly one translation by at most 2 pixels"
    assert found.abs().max() == 2 and len({tuple(s) for s in found.tolist()}) > 5


def test_rand_cutout_zeroes_one_square_of_half_the_size():
    x = torch.ones(64, 3, 32, 32)
    torch.manual_seed(1)
    out = rand_cutout(x)
    zero = out[:, 0] == 0
    assert torch.equal(zero, (out == 0).all(dim=1))  # every channel cut alike
    rows, cols = zero.any(dim=2), zero.any(dim=1)
    assert torch.equal(zero, rows[:, :, None] & cols[:, None, :])  # one axis-aligned rectangle
    heights, widths = rows.sum(1), cols.sum(1)
    assert heights.max() == 16 and widths.max() == 16 and heights.min() >= 8 and widths.min() >= 8
    # a square clipped by the border touches it
    inner = (heights == 16) & (widths == 16)
    assert inner.any() and (~inner).any()
    for b in torch.nonzero(~inner).flatten().tolist():
        clipped_rows = heights[b] < 16
        touches = (rows[b, 0] or rows[b, -1]) if clipped_rows else (cols[b, 0] or cols[b, -1])
        assert touches


def test_colour_ops_keep_their_invariants():
    x = images(16)
    torch.manual_seed(2)
    bright = rand_brightness(x)
    offset = (bright - x).flatten(1)
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-6)  # one offset per image
    assert offset.abs().max() <= 0.5
    saturated = rand_saturation(x)
    assert torch.allclose(saturated.mean(dim=1), x.mean(dim=1), atol=1e-5)  # channel mean kept
    contrasted = rand_contrast(x)
    assert torch.allclose(contrasted.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5)  # image mean kept
    ratio = (contrasted - contrasted.mean(dim=(1, 2, 3), keepdim=True)) / (x - x.mean(dim=(1, 2, 3), keepdim=True))
    assert ratio.min() >= 0.5 - 1e-3 and ratio.max() <= 1.5 + 1e-3
    assert AUGMENT_FNS["color"] == [rand_brightness, rand_saturation, rand_contrast]


def test_gradients_flow_through_diff_augment():
    x = images(4).requires_grad_(True)
    torch.manual_seed(3)
    diff_augment(x, FULL_POLICY).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_random_flip_mirrors_some_images():
    x = images(64)
    torch.manual_seed(4)
    out = random_flip(x)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert (same | flipped).all() and same.any() and flipped.any()


def test_uint8_to_unit():
    img = torch.tensor([0, 255, 51], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = uint8_to_unit(img.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    assert out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="uint8"):
        uint8_to_unit(img.float())


def test_probability_one_is_todays_diff_augment_and_zero_the_identity():
    x = images(6)
    torch.manual_seed(5)
    every_image = diff_augment(x, FULL_POLICY)
    torch.manual_seed(5)
    assert torch.equal(diff_augment(x, FULL_POLICY, p=1.0), every_image)
    assert diff_augment(x, FULL_POLICY, p=0.0) is x
    # a device tensor p of 0 or 1 gives the same images as the floats, image by image
    assert torch.equal(diff_augment(x, FULL_POLICY, p=torch.tensor(0.0)), x)
    torch.manual_seed(5)
    all_cut = diff_augment(x, "cutout", p=torch.tensor(1.0))
    assert (all_cut == 0).all(dim=1).flatten(1).any(dim=1).all()  # every image has its hole


def test_each_op_reaches_about_a_fraction_p_of_the_images():
    # cutout zeroes a 32 x 32 square, a whole number of pixels: the images it touched can be counted
    x = images(4000, size=16) * 0.5 + 0.75  # never 0 on its own
    torch.manual_seed(0)
    out = diff_augment(x, "cutout", p=0.3)
    cut = (out == 0).flatten(1).any(dim=1)
    assert abs(cut.float().mean().item() - 0.3) < 0.03
    assert torch.equal(out[~cut], x[~cut])
    # with two ops, each image gets each op independently: about p^2 get both
    torch.manual_seed(0)
    moved = diff_augment(x, "translation,cutout", p=torch.tensor(0.5))
    changed = (moved != x).flatten(1).any(dim=1)
    assert 0.70 < changed.float().mean().item() < 0.80  # 1 - (1 - 0.5)^2 = 0.75, less the zero translations


def test_gradients_flow_through_the_chosen_branch_only():
    x = images(64).requires_grad_(True)
    torch.manual_seed(1)
    diff_augment(x, "cutout", p=0.5).sum().backward()
    # an image left alone passes its gradient through whole (all ones); a cut one has a zero square
    whole = (x.grad == 1).flatten(1).all(dim=1)
    assert 10 < whole.sum() < 54 and (x.grad[~whole] == 0).flatten(1).any(dim=1).all()
