"""scripts/proxy.py: the held-out split written once, the training subset, sessions, variants, and the whole path
in --smoke mode (scored with efficientnet-lite0 when ../shared has the weights, else the FID is reported skipped)."""
import importlib.util
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("proxy", ROOT / "scripts" / "proxy.py")
proxy = importlib.util.module_from_spec(spec)
sys.modules["proxy"] = proxy
spec.loader.exec_module(proxy)

IDS = [f"n0000{b}_{i}" for b in range(3) for i in range(10)]


def test_the_split_is_drawn_once_then_read_back(tmp_path):
    path = str(tmp_path / "holdout.txt")
    held = proxy.settle_holdout(IDS, path, 5, seed=18)
    assert len(held) == 5 and held == sorted(held) and set(held) <= set(IDS)
    assert Path(path).read_text().split() == held
    # another seed (or another size) does not re-draw it: the file decides
    assert proxy.settle_holdout(IDS, path, 7, seed=99) == held
    # a split of other photos is refused
    with pytest.raises(proxy.ProxyError, match="not in the data"):
        proxy.settle_holdout(IDS[:10], path, 5, seed=18)


def test_training_ids_are_the_rest_or_a_seeded_subset_of_it():
    held = proxy.draw_holdout(IDS, 5, 18)
    train = proxy.training_ids(IDS, held, 0, 18)
    assert len(train) == 25 and not set(train) & set(held)
    subset = proxy.training_ids(IDS, held, 10, 18)
    assert len(subset) == 10 and set(subset) <= set(train) and subset == proxy.training_ids(IDS, held, 10, 18)


def test_sessions_split_the_run_and_end_exactly_at_its_kimg():
    assert proxy.session_kimgs(525.0, 3) == [175.0, 350.0, 525.0]
    assert proxy.session_kimgs(0.16, 1) == [0.16]


@pytest.mark.parametrize("line, flag", [("x --seed 3", "--seed"), ("x --max-kimg 2", "--max-kimg"),
                                        ("x --max-images 100", "--max-images")])
def test_variants_may_not_set_what_the_proxy_sets(line, flag):
    with pytest.raises(proxy.ProxyError, match=f"x: {flag} is set by the proxy"):
        proxy.read_proxy_variants(line, "v.txt")


def test_the_variants_file_reads():
    text = (ROOT / "scripts" / "variants_proxy.txt").read_text()
    assert proxy.read_proxy_variants(text, "variants_proxy.txt")[0].name == "baseline"


def test_the_committed_split_is_the_seeded_draw_of_the_dev_pack(shared_dir):
    with tarfile.open(shared_dir / "data" / "dogs_dev.tar.gz") as tar:
        ids = sorted(os.path.splitext(os.path.basename(m.name))[0] for m in tar.getmembers()
                     if m.name.startswith("all-dogs/") and m.name.endswith(".jpg"))
    held = Path(proxy.HOLDOUT_FILE).read_text().split()
    assert len(ids) == 19_080 and len(held) == len(set(held)) == 2_000
    assert held == proxy.draw_holdout(ids, 2_000, proxy.SPLIT_SEED)


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("proxy_smoke")
    code = proxy.main(["--smoke", "--out", str(out), "--weights", str(out / "no_weights.pth")])
    return out, code


def test_smoke_trains_every_variant_in_sessions_and_reports_the_fid_skipped(smoke_out, capsys):
    out, code = smoke_out
    assert code == 0
    table = (out / "table.md").read_text()
    assert "FID skipped: no efficientnet-lite0 weights" in table
    assert "| baseline | 0.2 |" in table and "| lr2x | 0.2 |" in table
    results = json.loads((out / "results.json").read_text())
    for row in results["table"]:
        run = row["runs"][0]
        assert run["returncode"] == 0 and row["fid_per_seed"] == [None]
        # two sessions, D judged after each, the second resumed to the full length
        assert [round(c["kimg"], 3) for c in run["d_checks"]] == [0.08, 0.16]
        assert all(-1 <= c["r_train"] <= 1 for c in run["d_checks"])
        run_dir = out / f"{row['variant']}_s0"
        assert (run_dir / "images.zip").is_file() and (run_dir / "samples" / "latest.png").is_file()
        assert "--resume auto" in (run_dir / "kernel.log").read_text()
    assert results["meta"]["train_photos"] == proxy.SMOKE_PHOTOS - proxy.SMOKE_HOLDOUT
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 0
    # the smoke split lives in OUT, never in scripts/
    assert (out / "smoke_holdout.txt").read_text().count("\n") == proxy.SMOKE_HOLDOUT


def test_smoke_scores_the_kept_runs_with_efficientnet_when_the_weights_exist(smoke_out, shared_dir, capsys):
    out, _ = smoke_out
    weights = shared_dir / "weights" / "efficientnet-lite0.pth"
    if not weights.is_file():
        pytest.skip(f"no {weights}")
    capsys.readouterr()
    assert proxy.main(["--smoke", "--out", str(out), "--weights", str(weights)]) == 0
    log = capsys.readouterr().out
    assert log.count("not run again") == 2  # the runs in OUT are scored, not trained again
    results = json.loads((out / "results.json").read_text())
    for row in results["table"]:
        assert row["fid_mean"] > 0 and 0 <= row["d"] <= 1
    assert "efficientnet-lite0." in (out / "table.md").read_text()
