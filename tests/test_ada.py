"""ADA's heuristic: p follows the sign of D's outputs on real images, by the official rule, clamped to [0, 1]."""
import pytest
import torch
import torch.nn.functional as F

from src.ada import ADA_INTERVAL, ADA_KIMG, ADA_TARGET, AdaController


def test_the_official_defaults():
    assert (ADA_TARGET, ADA_INTERVAL, ADA_KIMG) == (0.6, 4, 500.0)
    assert float(AdaController("cpu").p) == 0.0


def test_p_moves_by_the_images_of_an_interval_over_ada_kimg():
    # 4 D steps of 16 images = 64 images per adjustment; ada_kimg 0.64 -> each adjustment moves p by 64 / 640 = 0.1
    ada = AdaController("cpu", interval=4, ada_kimg=0.64)
    for _ in range(3):
        ada.observe(torch.full((16,), 2.0))
    assert float(ada.p) == 0.0  # the interval is not complete yet
    ada.observe(torch.full((16, 1), 2.0))
    assert float(ada.p) == pytest.approx(0.1)
    for _ in range(4):
        ada.observe(torch.full((16,), 2.0))
    assert float(ada.p) == pytest.approx(0.2)
    # 4 steps of 10 positive and 6 negative logits: r = (10 - 6) / 16 = 0.25 < 0.6, p goes down by 0.1
    mixed = torch.tensor([1.0] * 10 + [-1.0] * 6)
    for _ in range(4):
        ada.observe(mixed)
    assert float(ada.p) == pytest.approx(0.1)
    # r exactly at the target leaves p where it is: 8 of 10 positive gives r = 0.6
    for _ in range(4):
        ada.observe(torch.tensor([1.0] * 8 + [-1.0] * 2))
    assert float(ada.p) == pytest.approx(0.1)


def test_p_stays_in_zero_one():
    ada = AdaController("cpu", interval=1, ada_kimg=0.008)  # each step of 16 images moves p by 2
    ada.observe(-torch.ones(16))
    assert float(ada.p) == 0.0
    ada.observe(torch.ones(16))
    assert float(ada.p) == 1.0


def train_d_and_watch_p(real_pool, fake_fn, steps=400, seed=0):
    """A linear D trained with the hinge loss on batches from real_pool against fake_fn(); ADA watches its real
    logits (interval 4, p moving by 1 per 3,200 images). Returns p at the end."""
    torch.manual_seed(seed)
    D = torch.nn.Linear(real_pool.shape[1], 1)
    opt = torch.optim.Adam(D.parameters(), lr=1e-2)
    ada = AdaController("cpu", ada_kimg=3.2)
    for _ in range(steps):
        real = real_pool[torch.randint(0, len(real_pool), (16,))]
        real_logit, fake_logit = D(real), D(fake_fn(16))
        loss = F.relu(1 - real_logit).mean() + F.relu(1 + fake_logit).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ada.observe(real_logit)
    return float(ada.p)


def test_p_rises_when_d_overfits_a_handful_of_images():
    # 8 fixed "training images" against fresh noise of the same distribution: D learns the 8 by heart
    handful = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    p = train_d_and_watch_p(handful, lambda n: torch.randn(n, 64))
    assert p > 0.8  # 6,400 real images seen: p would reach 1 after 3,200 if every interval said "overfit"


def test_p_stays_near_zero_when_d_cannot_tell():
    # reals and fakes from the same distribution, fresh every step: D's signs on reals are a coin toss
    p = train_d_and_watch_p(torch.randn(100_000, 64, generator=torch.Generator().manual_seed(2)),
                            lambda n: torch.randn(n, 64))
    assert p < 0.05


def test_state_dict_keeps_p_and_the_half_finished_interval():
    ada = AdaController("cpu", interval=4, ada_kimg=0.64)
    for _ in range(6):
        ada.observe(torch.ones(16))
    state = ada.state_dict()
    assert state["p"] == pytest.approx(0.1) and state["steps"] == 2 and state["images"] == 32
    restored = AdaController("cpu", interval=4, ada_kimg=0.64)
    restored.load_state_dict(state)
    for controller in (ada, restored):
        for _ in range(2):
            controller.observe(torch.ones(16))
    assert float(restored.p) == float(ada.p) == pytest.approx(0.2)
    assert all(isinstance(v, (int, float)) for v in state.values())  # plain numbers for the checkpoint


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="target"):
        AdaController("cpu", target=1.5)
    with pytest.raises(ValueError, match="interval"):
        AdaController("cpu", interval=0)
