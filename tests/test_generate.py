"""Generation: truncation, balanced labels, uint8 conversion, and the atomic images.zip."""
import io
import os
import time
import zipfile
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import src.generate
from src.generate import (TRAINING_BREEDS, ZIP_CHUNK, GenerationTiming, balanced_labels, breed_counts, eval_mode,
                          generate_images, generation_batch_candidates, generation_probe_seconds, measure_generation,
                          measure_zip_seconds, pick_generation_batch, proportional_labels, sample_z, to_uint8,
                          write_images_zip)


class LabelColourG(torch.nn.Module):
    """A stand-in generator: the image's red channel encodes the label, the rest is z."""
    z_dim, n_classes = 4, 3

    def forward(self, z, y):
        img = torch.zeros(len(z), 3, 64, 64)
        img[:, 0] = (y.float() / 2 * 2 - 1)[:, None, None]
        img[:, 1] = torch.tanh(z[:, :1])[:, :, None]
        return img


def test_truncation_bounds_every_latent():
    z = sample_z(2000, 16, "cpu", truncation=0.5, generator=torch.Generator().manual_seed(0))
    assert z.abs().max() <= 0.5
    assert z.std() > 0.2  # still spread inside the bound, not collapsed to 0


def test_no_truncation_is_standard_normal():
    z = sample_z(20000, 8, "cpu", generator=torch.Generator().manual_seed(0))
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02 and z.abs().max() > 3


def test_balanced_labels_counts():
    labels = balanced_labels(10000, 120, "cpu", torch.Generator().manual_seed(0))
    counts = torch.bincount(labels, minlength=120)
    assert counts.min() == 83 and counts.max() == 84 and counts.sum() == 10000


def test_proportional_labels_by_largest_remainder():
    # quotas 7 x [5, 3, 2] / 10 = [3.5, 2.1, 1.4]: floors [3, 2, 1], the one left goes to the largest remainder (0.5)
    labels = proportional_labels(7, torch.tensor([5, 3, 2]), "cpu", torch.Generator().manual_seed(0))
    assert torch.bincount(labels, minlength=3).tolist() == [4, 2, 1]
    # equal remainders: the lower class first; a breed with no image gets none
    assert torch.bincount(proportional_labels(4, torch.tensor([1, 1, 1, 0]), "cpu"), minlength=4).tolist() == [2, 1, 1, 0]


def test_the_submission_follows_the_data_in_exact_counts_shuffled_and_seeded():
    counts = torch.tensor([300, 100, 50, 50])
    labels = proportional_labels(10_000, counts, "cpu", torch.Generator().manual_seed(1))
    assert torch.bincount(labels, minlength=4).tolist() == [6000, 2000, 1000, 1000]
    assert torch.equal(labels, proportional_labels(10_000, counts, "cpu", torch.Generator().manual_seed(1)))
    assert not torch.equal(labels, labels.sort().values)  # shuffled, not in class order


def test_generated_breeds_follow_the_counts_when_given():
    # the stand-in G writes the label into the red channel: 0 -> 0, 1 -> 128, 2 -> 255
    red = generate_images(LabelColourG(), 30, "cpu", seed=3, breed_counts=torch.tensor([1, 1, 4]))[:, 0, 0, 0]
    assert [red.tolist().count(v) for v in (0, 128, 255)] == [5, 5, 20]
    # without counts, balanced as before
    red = generate_images(LabelColourG(), 30, "cpu", seed=3)[:, 0, 0, 0]
    assert [red.tolist().count(v) for v in (0, 128, 255)] == [10, 10, 10]


def test_breed_counts_and_training_draws_follow_them():
    counts = breed_counts(torch.tensor([0, 0, 0, 2, 0, 2]), 3)
    assert counts.tolist() == [4, 0, 2]
    torch.manual_seed(0)
    drawn = torch.bincount(TRAINING_BREEDS["data"](30_000, counts), minlength=3)
    assert drawn[1] == 0 and abs(drawn[0].item() / 30_000 - 2 / 3) < 0.01
    uniform = torch.bincount(TRAINING_BREEDS["uniform"](30_000, counts), minlength=3)
    assert all(abs(c / 30_000 - 1 / 3) < 0.01 for c in uniform.tolist())


def test_to_uint8_maps_range_and_rounds():
    img = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0])
    assert to_uint8(img).tolist() == [0, 0, 128, 255, 255]


def test_generate_images_is_seeded_and_balanced():
    first = generate_images(LabelColourG(), 30, "cpu", batch_size=7, seed=3)
    again = generate_images(LabelColourG(), 30, "cpu", batch_size=7, seed=3)
    other = generate_images(LabelColourG(), 30, "cpu", batch_size=7, seed=4)
    assert first.dtype == torch.uint8 and first.shape == (30, 3, 64, 64)
    assert torch.equal(first, again) and not torch.equal(first, other)
    red_levels = first[:, 0, 0, 0].tolist()
    assert sorted(set(red_levels)) == [0, 128, 255] and all(red_levels.count(v) == 10 for v in (0, 128, 255))


def test_zip_holds_exact_pngs(tmp_path):
    images = torch.randint(0, 256, (25, 3, 64, 64), dtype=torch.uint8)
    path = str(tmp_path / "images.zip")
    write_images_zip(images, path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert names == [f"{i}.png" for i in range(25)]
        decoded = Image.open(io.BytesIO(archive.read("7.png")))
        assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (64, 64)
        assert np.array_equal(np.asarray(decoded), images[7].permute(1, 2, 0).numpy())
    assert os.listdir(tmp_path) == ["images.zip"]


def test_zip_failure_keeps_the_previous_zip(tmp_path):
    path = str(tmp_path / "images.zip")
    write_images_zip(torch.zeros(3, 3, 64, 64, dtype=torch.uint8), path)
    before = open(path, "rb").read()
    with mock.patch("zipfile.ZipFile.writestr", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            write_images_zip(torch.ones(3, 3, 64, 64, dtype=torch.uint8), path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["images.zip"]  # no temporary left behind


def test_zip_rejects_float_images(tmp_path):
    with pytest.raises(ValueError, match="uint8 N x 3 x H x W"):
        write_images_zip(torch.zeros(2, 3, 64, 64), str(tmp_path / "images.zip"))


def test_images_do_not_depend_on_the_batch_size():
    # the run picks its batch size by timing, so the same seed must give the same images at any batch size
    small = generate_images(LabelColourG(), 30, "cpu", batch_size=7, seed=3, truncation=1.0)
    whole = generate_images(LabelColourG(), 30, "cpu", batch_size=30, seed=3, truncation=1.0)
    assert torch.equal(small, whole)


class Abandon(Exception):
    pass


def stop_on_call(n):
    calls = {"n": 0}

    def check():
        calls["n"] += 1
        if calls["n"] == n:
            raise Abandon()
    return check, calls


def test_generation_checks_before_every_batch():
    check, calls = stop_on_call(0)
    generate_images(LabelColourG(), 30, "cpu", batch_size=7, stop_check=check)
    assert calls["n"] == 5  # batches of 7, 7, 7, 7, 2
    check, calls = stop_on_call(3)
    with pytest.raises(Abandon):
        generate_images(LabelColourG(), 30, "cpu", batch_size=7, stop_check=check)
    assert calls["n"] == 3


def test_zip_abandoned_between_chunks_keeps_the_previous_zip(tmp_path):
    path = str(tmp_path / "images.zip")
    write_images_zip(torch.zeros(3, 3, 64, 64, dtype=torch.uint8), path)
    before = open(path, "rb").read()
    check, calls = stop_on_call(2)  # after the first ZIP_CHUNK images are in
    with pytest.raises(Abandon):
        write_images_zip(torch.ones(ZIP_CHUNK + 10, 3, 64, 64, dtype=torch.uint8), path, stop_check=check)
    assert calls["n"] == 2
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["images.zip"]


def test_generation_timing_tries_the_larger_batch_only_when_cheap(monkeypatch):
    timed = measure_generation(LabelColourG(), "cpu", (64, 500))
    assert sorted(timed) == [64, 500]  # the stand-in is fast: both candidates timed
    for batch_size, timing in timed.items():
        assert timing.batch_size == batch_size and len(timing.per_image_s) == 3
        assert timing.seconds_per_image > 0 and timing.images.shape == (4 * batch_size, 3, 64, 64)
    monkeypatch.setattr(src.generate, "GENERATE_TRY_S", 0.0)  # now the 500 batch is too dear to try
    monkeypatch.setattr(src.generate, "GENERATE_PROBE_S", 0.0)  # and one timed call is the least
    timed = measure_generation(LabelColourG(), "cpu", (64, 500))
    assert sorted(timed) == [64] and len(timed[64].per_image_s) == 1


@pytest.mark.parametrize("n_images, candidates", [(10000, (64, 500)), (200, (64, 200)), (30, (30,))])
def test_no_generation_batch_is_larger_than_the_output(n_images, candidates):
    assert generation_batch_candidates(n_images) == candidates


class SlowBatchesG(LabelColourG):
    """A generator whose `slow`-th forwards (counted from 1) take 0.3 s; every other one is instant."""

    def __init__(self, slow=()):
        super().__init__()
        self.calls, self.slow = 0, set(slow)

    def forward(self, z, y):
        self.calls += 1
        if self.calls in self.slow:
            time.sleep(0.3)
        return super().forward(z, y)


def test_generation_is_timed_warm_batch_by_batch_and_one_slow_batch_does_not_move_it():
    # forwards: the first, on 8 images (1), then at 64 the call's first batch (2: allocates, left out) and its
    # timed batches (3, 4, 5), of which 4 is slowed down by "another process"
    timed = measure_generation(SlowBatchesG(slow={2, 4}), "cpu", batch_sizes=(64,))[64]
    assert timed.warmup_s >= 0.3 / 64
    assert len(timed.per_image_s) == 3 and timed.per_image_s[1] >= 0.3 / 64
    assert timed.seconds_per_image < 0.05 / 64


class CountingSleepyG(LabelColourG):
    """A generator that takes `per_image` seconds per image, and counts its forwards."""

    def __init__(self, per_image):
        super().__init__()
        self.per_image, self.calls = per_image, 0

    def forward(self, z, y):
        self.calls += 1
        time.sleep(self.per_image * len(z))
        return super().forward(z, y)


@pytest.mark.parametrize("batch_s", [0.01, 0.4, 1.2])
def test_the_probe_cost_estimate_counts_the_batches_measure_generation_makes(batch_s):
    G = CountingSleepyG(batch_s / 64)
    measure_generation(G, "cpu", (64,))
    # the first forward is on 8 images (an eighth of a batch), the others are batches of 64
    assert generation_probe_seconds(64, batch_s / 64) == pytest.approx((G.calls - 1) * batch_s)


def test_eval_mode_restores_every_submodule_mode():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    model.train()
    model[1].eval()  # a mixed state must come back as it was, not as model.train(True) would set it
    with pytest.raises(Abandon):
        with eval_mode(model):
            assert not any(sub.training for sub in model.modules())
            raise Abandon()
    assert [sub.training for sub in model.modules()] == [True, True, False, False]


def test_zip_timing_is_per_image_and_positive():
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    assert 0 < measure_zip_seconds(images) < 1.0


@pytest.mark.parametrize("per_image, picked", [
    ({64: 0.010, 500: 0.012}, 500),  # within the margin: the large batch, whose time scatters least
    ({64: 0.008, 500: 0.012}, 64),   # clearly faster (by a third)
    ({64: 0.010}, 64),               # the only one timed (the large one was too dear to time)
])
def test_the_large_batch_wins_unless_a_small_one_is_clearly_faster(per_image, picked):
    timed = {size: GenerationTiming(size, seconds, [seconds], None) for size, seconds in per_image.items()}
    assert pick_generation_batch(timed) == picked
