"""The MiFID backbones: the FID Inception's layout and forward, EfficientNet-Lite0's padding and its ImageNet accuracy."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from src.efficientnet import EffNetSameConv2d, EfficientNetLite0
from src.inception import FIDInceptionV3, _fid_tf_avg_pool
from src.mifid import load_feature_extractor, memorization_distance

SHARED = Path(__file__).resolve().parents[2] / "shared"

# The 120 Stanford Dogs wnids in ImageNet-1k's standard (sorted-wnid) order: 151..268 are the sorted wnids from
# n02085620 to n02113978, which include dalmatian n02110341 (not a Stanford breed); dingo, dhole and African
# hunting dog sit at 273..275 (after the wolves and the coyote).
IMAGENET_OUTSIDE_DOG_RANGE = {"n02115641": 273, "n02115913": 274, "n02116738": 275}
IMAGENET_DALMATIAN = "n02110341"


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared material not found: {path}")
    return path


def imagenet_index_of_dog_wnids(stanford_wnids: set[str]) -> dict[str, int]:
    in_range = sorted((stanford_wnids - set(IMAGENET_OUTSIDE_DOG_RANGE)) | {IMAGENET_DALMATIAN})
    index = {wnid: 151 + i for i, wnid in enumerate(in_range)}
    index.update(IMAGENET_OUTSIDE_DOG_RANGE)
    return index


@pytest.fixture(scope="module")
def dog_subset():
    """200 dev-pack crops chosen by a fixed seed: (uint8 N x 3 x 64 x 64, ImageNet class indices)."""
    pack = shared_file("data", "dogs_dev.tar.gz")
    wnid_of, jpeg_of = {}, {}
    with tarfile.open(pack) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and "Annotation" in parts:
                wnid_of[parts[-1]] = parts[-2].split("-")[0]
            elif member.isfile() and parts[-1].endswith(".jpg"):
                jpeg_of[parts[-1][:-4]] = tar.extractfile(member).read()
    index = imagenet_index_of_dog_wnids(set(wnid_of.values()))
    assert len(index) == 121 and index["n02085620"] == 151 and index["n02113978"] == 268
    ids = sorted(jpeg_of)
    picks = np.random.default_rng(0).choice(len(ids), 200, replace=False)
    images = [np.asarray(Image.open(io.BytesIO(jpeg_of[ids[i]])).convert("RGB")).transpose(2, 0, 1) for i in picks]
    labels = [index[wnid_of[ids[i]]] for i in picks]
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def test_inception_state_dict_has_pytorch_fid_keys_and_shapes():
    layout = json.loads(shared_file("weights", "pt_inception_keys_shapes.json").read_text())
    mine = {k: list(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    assert sorted(mine) == sorted(layout)
    assert {k: v for k, v in mine.items() if v != layout[k]} == {}


def test_inception_on_random_weights_gives_2048_features_for_64x64_input():
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    with torch.no_grad():
        feats = model.features(torch.rand(2, 3, 64, 64))
        logits = model.fc(feats)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pooled ReLU outputs


def test_inception_uses_the_fid_pooling_variants():
    # TF average pool ignores padded zeros: a constant map stays constant up to the corners.
    ones = torch.ones(1, 1, 5, 5)
    assert torch.allclose(_fid_tf_avg_pool(ones), ones)
    model = FIDInceptionV3()
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"
    assert not hasattr(model, "AuxLogits")


def test_same_conv_pads_like_tensorflow():
    conv = EffNetSameConv2d(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # TF "same", stride 2, even input: output ceil(4/2) = 2, the single padding row/column goes bottom/right.
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    assert torch.equal(conv(x), expected)
    conv5 = EffNetSameConv2d(1, 1, 5, stride=1)
    assert conv5(x).shape == x.shape


def test_efficientnet_random_weights_give_1280_features_at_any_size():
    model = EfficientNetLite0().eval()
    with torch.no_grad():
        assert model.features(torch.rand(1, 3, 64, 64)).shape == (1, 1280)
        assert model(torch.rand(1, 3, 50, 70)).shape == (1, 1000)


@pytest.fixture(scope="module")
def lite0_on_dogs(dog_subset):
    """(extractor with the shared efficientnet-lite0 weights, images, labels, features of the images)."""
    extractor = load_feature_extractor("auto", str(shared_file("weights", "efficientnet-lite0.pth")), "cpu")
    images, labels = dog_subset
    return extractor, images, labels, extractor(images)


def test_efficientnet_lite0_weights_classify_the_dev_dogs(lite0_on_dogs):
    extractor, images, labels, feats = lite0_on_dogs
    assert extractor.name == "efficientnet-lite0" and extractor.dim == 1280
    assert feats.shape == (len(images), 1280) and feats.dtype == torch.float32
    logits = extractor.model._fc(feats)  # the classifier on the pooled features: same as the full forward
    top5 = logits.topk(5, dim=1).indices
    top1_acc = (top5[:, 0] == labels).float().mean().item()
    top5_acc = (top5 == labels[:, None]).any(dim=1).float().mean().item()
    print(f"efficientnet-lite0 on {len(labels)} dev crops: top-1 {top1_acc:.3f}, top-5 {top5_acc:.3f}")
    assert top5_acc > 0.80
    assert top1_acc > 0.40


def test_efficientnet_lite0_default_eps_catches_flips_but_not_new_photos(lite0_on_dogs):
    extractor, images, _, feats = lite0_on_dogs
    train_feats, new_feats = feats[:150], feats[150:]
    flipped_feats = extractor(images[:50].flip(-1))
    d_flipped = memorization_distance(flipped_feats, train_feats)
    d_new = memorization_distance(new_feats, train_feats)
    assert d_flipped < extractor.default_eps < d_new
