"""Plots from stats.jsonl (with and without matplotlib), status lines, sample grids and the interpolation strip."""
from __future__ import annotations

import builtins
import json
import os

import pytest
import torch
from PIL import Image

from src.monitor import format_status, make_grid_latents, save_interpolation_strip, save_sample_grid, tile_images
from src.report import plotted_series, read_stats, write_plots


def status_record(step, fid=None):
    record = {"time": 1000.0 + step, "step": step, "epoch": step / 10, "kimg": step * 0.064, "images_per_s": 500.0,
              "g_loss": 1.0 / step, "d_loss": 2.0 - 0.1 * step, "d_real": 0.5, "d_fake": -0.5, "lr_g": 1e-4,
              "lr_d": 4e-4, "batch_size": 64, "n_dis": 1, "elapsed_s": 10.0 * step, "train_left_s": 3600.0,
              "next_ckpt_s": 120.0}
    if fid is not None:
        record["fid"] = fid
    return record


@pytest.fixture
def stats_dir(tmp_path):
    lines = [json.dumps(status_record(1)), json.dumps(status_record(2, fid=80.5)),
             json.dumps({"time": 1003.0, "event": "rollback", "step": 1, "kimg": 0.064, "lr_scale": 0.5}),
             json.dumps(status_record(3)), json.dumps(status_record(4, fid=61.0)), '{"time": 10']  # cut-off last line
    (tmp_path / "stats.jsonl").write_text("\n".join(lines))
    return str(tmp_path)


def test_read_stats_keeps_status_records_only(stats_dir):
    records = read_stats(os.path.join(stats_dir, "stats.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r.get("fid") for r in records] == [None, 80.5, None, 61.0]


def test_adas_p_is_plotted_beside_d_outputs_only_when_logged():
    plain = [status_record(1), status_record(2)]
    assert [label for _, label, *_ in plotted_series(plain)[1][1]] == ["D(x)", "D(G(z))"]
    with_ada = [{**status_record(1), "ada_p": 0.0}, {**status_record(2), "ada_p": 0.25}]
    title, series = plotted_series(with_ada)[1]
    assert "ADA" in title and series[-1][:2] == ("ada_p", "ADA p")
    assert series[-1][2] == pytest.approx([0.064, 0.128]) and series[-1][3] == [0.0, 0.25]
    # the FID panel has nothing to draw without FID records
    assert plotted_series(plain)[2][1] == []


def test_write_plots_draws_one_png(stats_dir):
    pytest.importorskip("matplotlib")
    written = write_plots(stats_dir)
    assert written == [os.path.join(stats_dir, "plots.png")]
    with Image.open(written[0]) as img:
        assert img.format == "PNG" and img.width > 500 and img.height > 400


def test_write_plots_leaves_the_matplotlib_backend_alone(stats_dir):
    """In a notebook the inline backend must survive the pasted cell: no pyplot, no matplotlib.use('Agg')."""
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        assert write_plots(stats_dir) == [os.path.join(stats_dir, "plots.png")]
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_write_plots_without_matplotlib_is_a_note(stats_dir, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert write_plots(stats_dir) == []
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(stats_dir, "plots.png"))


def test_write_plots_without_stats(tmp_path, capsys):
    assert write_plots(str(tmp_path)) == []
    assert "nothing to plot" in capsys.readouterr().out


def test_status_line_has_the_numbers():
    line = format_status(status_record(2, fid=80.5))
    for part in ("step 2", "kimg 0.1", "500 img/s", "G 0.500", "D 1.800", "D(x) +0.500", "D(G(z)) -0.500",
                 "lr 1.00e-04/4.00e-04", "bs 64", "20.0s elapsed", "1h00m00s left", "ckpt in 2m00s", "FID 80.50"):
        assert part in line, part
    assert "ADA" not in line
    assert "ADA p 0.125" in format_status({**status_record(2), "ada_p": 0.125})


class TinyG(torch.nn.Module):
    """A stand-in generator: image colour from the label, brightness from z."""
    z_dim, n_classes = 4, 3

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, z, y):
        base = torch.nn.functional.one_hot(y, 3).float()[:, :, None, None] * 2 - 1
        return torch.tanh(self.scale * (base + z[:, :1, None, None])).expand(-1, 3, 64, 64)


def test_sample_grid_and_interpolation_strip(tmp_path):
    G_ema = TinyG()
    grid_z, grid_y = make_grid_latents(G_ema.z_dim, G_ema.n_classes, seed=0, device="cpu")
    again_z, again_y = make_grid_latents(G_ema.z_dim, G_ema.n_classes, seed=0, device="cpu")
    assert torch.equal(grid_z, again_z) and torch.equal(grid_y, again_y)
    assert torch.bincount(grid_y).tolist() == [22, 21, 21]
    path = save_sample_grid(G_ema, grid_z, grid_y, str(tmp_path), kimg=12.7)
    assert path == os.path.join(str(tmp_path), "samples", "grid_000012.png")
    for name in (path, os.path.join(str(tmp_path), "samples", "latest.png")):
        with Image.open(name) as img:
            assert img.size == (8 * 66 + 2, 8 * 66 + 2)  # 8 x 8 tiles of 64 px with 2 px padding
    strip = save_interpolation_strip(G_ema, str(tmp_path / "interp.png"), n_rows=3, steps=5)
    with Image.open(strip) as img:
        assert img.size == (5 * 66 + 2, 3 * 66 + 2)


def test_tile_images_layout_by_hand():
    # 3 constant 2x2 tiles in rows of 2, padding 1 of value 9: tile k sits at row k // 2, column k % 2
    images = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    grid = tile_images(images, nrow=2, padding=1, pad_value=9.0)
    expected = torch.tensor([[9, 9, 9, 9, 9, 9, 9],
                             [9, 0, 0, 9, 1, 1, 9],
                             [9, 0, 0, 9, 1, 1, 9],
                             [9, 9, 9, 9, 9, 9, 9],
                             [9, 2, 2, 9, 9, 9, 9],
                             [9, 2, 2, 9, 9, 9, 9],
                             [9, 9, 9, 9, 9, 9, 9]], dtype=torch.float32)
    assert torch.equal(grid, expected[None])
