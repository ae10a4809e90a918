"""scripts/gpu_protocol.py: variants files, the time plan, reading a kernel's stats, and the whole call on the CPU."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_protocol.py"
spec = importlib.util.spec_from_file_location("gpu_protocol", SCRIPT)
gpu_protocol = importlib.util.module_from_spec(spec)
sys.modules["gpu_protocol"] = gpu_protocol  # dataclasses look their module up while the script is executed
spec.loader.exec_module(gpu_protocol)

PACK_BYTES = 22_095_507  # ../shared/data/dogs_dev.tar.gz


def test_variants_file_names_flags_comments_blank_lines_and_quotes():
    text = ("# the open questions\n"
            "\n"
            "default\n"
            "bs256 --batch-size 256 --lr-ref-batch 64   # linear lr rule\n"
            "   noaug --diffaug \"\"\n"
            "attn32 --attn-res 32 --seed 1\n")
    variants = gpu_protocol.parse_variants(text, "v.txt")
    assert [(v.name, v.flags) for v in variants] == [
        ("default", ()),
        ("bs256", ("--batch-size", "256", "--lr-ref-batch", "64")),
        ("noaug", ("--diffaug", "")),
        ("attn32", ("--attn-res", "32", "--seed", "1")),
    ]


@pytest.mark.parametrize("text, message", [
    ("bs256 256", "v.txt:1: '256' is not a flag (flags start with --, values follow them)"),
    ("--batch-size 256", "v.txt:1: a line starts with the variant's name, then its flags; got '--batch-size' first"),
    ("a/b --n-dis 2", "v.txt:1: variant name 'a/b': use letters, digits, '_', '.' and '-' (it names a folder)"),
    ("x\n\nx --n-dis 2", "v.txt:3: variant 'x' is already defined on line 1"),
    ("x --no-such-flag", "v.txt:1: kernel.py has no flag '--no-such-flag' (see python kernel.py --help)"),
    ("x --batch-size abc", "v.txt:1: argument --batch-size: invalid int value: 'abc'"),
    ("x --batch-size", "v.txt:1: argument --batch-size: expected one argument"),
    ("x --loss nope", "v.txt:1: --loss 'nope': choose one of hinge, bce, ls, rals, wgan-gp"),
    ("x --recipe nope", "v.txt:1: unknown recipe 'nope'; choose one of dcgan, cgan, acgan, sngan, sagan, biggan, demo"),
    ("x --out /tmp/o", "v.txt:1: --out is set by the protocol, the same for every variant"),
    ("x --fid-every 10s", "v.txt:1: --fid-every is set by the protocol, the same for every variant"),
    ("x --n-images 500", "v.txt:1: --n-images must be the same for every variant: give it in --common"),
    ("x --diffaug 'a", "v.txt:1: cannot read \"x --diffaug 'a\" (No closing quotation)"),
    ("# only a comment\n\n", "v.txt: no variants (one a line: a name, then the kernel flags it changes)"),
])
def test_bad_variants_file_is_one_clear_error(text, message):
    with pytest.raises(gpu_protocol.ProtocolError) as caught:
        gpu_protocol.parse_variants(text, "v.txt")
    assert str(caught.value) == message


def test_the_issue_plan_fits_nine_minutes_and_a_sequential_one_is_refused():
    # 6 minutes x 4 variants at once: unpack 21.07 MiB x 0.4 s + (360 + 30) s + 40 + 4 x 20 s = 518.4 s < 540 s
    plan = gpu_protocol.quality_plan(4, 4, 360.0, PACK_BYTES, gpu_protocol.GPU_COSTS)
    assert sum(s for _, s in plan) == pytest.approx(PACK_BYTES / 2**20 * 0.4 + 390 + 120)
    assert gpu_protocol.check_plan(plan, 540.0, "advice").endswith("= ~8m38s of the 9m00s limit")
    # two at a time: two waves of 390 s -> 908 s
    two_waves = gpu_protocol.quality_plan(4, 2, 360.0, PACK_BYTES, gpu_protocol.GPU_COSTS)
    with pytest.raises(gpu_protocol.ProtocolError) as caught:
        gpu_protocol.check_plan(two_waves, 540.0, "use fewer variants")
    assert str(caught.value).startswith("the plan needs ~15m08s, more than the 9m00s limit (unpack ~8.4s + training: "
                                        "2 waves of up to 2 kernels x 6m00s (+30s start/exit) ~13m00s")
    assert str(caught.value).endswith("): use fewer variants")


def test_throughput_plan_of_the_default_probes_fits():
    # 3 batches x (off: 30 s, on: 30 + 60 s), each + 15 s start/exit: 3 x 45 + 3 x 105 = 450 s, + unpack 8.4 s
    budgets = [30.0] * 3 + [90.0] * 3
    plan = gpu_protocol.throughput_plan(budgets, PACK_BYTES, gpu_protocol.GPU_COSTS)
    assert sum(s for _, s in plan) == pytest.approx(450.0 + PACK_BYTES / 2**20 * 0.4)
    assert gpu_protocol.check_plan(plan, 540.0, "advice").endswith("= ~7m38s of the 9m00s limit")


def test_refused_plan_is_one_line_and_runs_nothing(tmp_path, tiny_data_dir, capsys):
    variants = tmp_path / "v.txt"
    variants.write_text("a\nb --n-dis 2\nc --batch-size 32\nd --attn-res 32\n")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not read before the plan")
    code = gpu_protocol.main(["--data", tiny_data_dir, "--weights", str(weights), "--minutes", "6", "--parallel", "1",
                              "--variants", str(variants), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[protocol] error: the plan needs ~28m00s, more than the 9m00s limit")
    assert not (tmp_path / "w" / "variants").exists() and not (tmp_path / "out").exists()


def test_missing_inputs_are_one_clear_line(tmp_path, capsys):
    assert gpu_protocol.main(["--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == \
        "[protocol] error: give --data PACK (dogs_dev.tar.gz or a Kaggle-layout folder), or --smoke"
    assert gpu_protocol.main(["--data", str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"[protocol] error: --data {tmp_path / 'nope.tar.gz'}: no such file or folder"
    assert gpu_protocol.main(["--smoke", "--common", "--fid-samples 'x", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "[protocol] error: --common \"--fid-samples 'x\": No closing quotation"
    assert gpu_protocol.main(["--smoke", "--throughput", "--batches", "64,big", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == \
        "[protocol] error: --batches '64,big': a comma list of batch sizes, e.g. 64,128,256"
    assert gpu_protocol.main(["--smoke", "--common", "--out /x", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == \
        "[protocol] error: variant default with --common: --out is set by the protocol, the same for every variant"


def test_read_stats_speed_curve_and_events(tmp_path):
    records = [
        dict(time=100.0, step=10, kimg=0.64, images_per_s=50.0, elapsed_s=12.0, batch_size=64),   # warm-up tick
        dict(time=110.0, step=30, kimg=1.92, images_per_s=128.0, elapsed_s=22.0, batch_size=64, fid=250.0),
        dict(event="rollback", time=111.0, step=30),
        dict(time=130.0, step=50, kimg=3.20, images_per_s=64.0, elapsed_s=42.0, batch_size=64),
        dict(time=135.0, step=60, kimg=3.84, images_per_s=128.0, elapsed_s=47.0, batch_size=64, fid=180.0),
    ]
    path = tmp_path / "stats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"time": 140.0, "st')  # killed mid-line
    stats = gpu_protocol.read_stats(str(path))
    # images/s: median of the ticks after the first (128, 64, 128) = 128; ms/round: 500, 1000, 500 -> 500
    assert stats == dict(steps=60, kimg=3.84, batch_size=64, training_s=47.0, status_ticks=4, images_per_s=128.0,
                         ms_per_round=500.0, fid_curve=[[22.0, 1.92, 250.0], [47.0, 3.84, 180.0]], rollbacks=1, ooms=0)
    assert gpu_protocol.read_stats(str(tmp_path / "absent.jsonl"))["steps"] == 0


def test_smoke_call_trains_scores_and_writes_the_four_files(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_protocol.main(["--smoke", "--out", str(out), "--work", str(work)]) == 0
    assert sorted(os.listdir(out)) == ["contact_sheet.png", "results.json", "table.md", "variants.log"]
    assert all((out / name).stat().st_size < 16 * 2**20 for name in os.listdir(out))

    results = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in results["variants"]] == ["default", "bs8"]
    assert results["variants"][1]["flags"] == ["--batch-size", "8"]
    for v in results["variants"]:
        assert v["returncode"] == 0 and v["stop_reason"] == "deadline" and v["steps"] > 0
        assert v["images_per_s"] > 0 and v["wall_s"] > 0 and v["n_gen"] == 16 and 0 < v["d"] <= 1
        assert v["fid"] > 0.01  # the calibrated random backbone tells generated from real images
    default, bs8 = results["variants"]
    assert default["fid"] != bs8["fid"] and default["d"] != bs8["d"]  # each variant's own zip was scored
    assert default["batch_size"] == 16 and bs8["batch_size"] == 8
    assert results["meta"]["n_real"] == len(os.listdir(work / "smoke_dogs" / "all-dogs"))
    assert set(results["meta"]["timings"]) == {"unpack_s", "training_s", "scoring_s", "total_s"}

    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split(" | ")[0] for row in rows] == ["| default", "| bs8"]
    assert f"**{results['variants'][1]['fid']:.1f}**" in rows[1] and "`--batch-size 8`" in rows[1]
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == (2 * 530, 530 + 28)  # two labelled 8x8 grids of 64 px with 2 px padding
    log = (out / "variants.log").read_text()
    assert log.count("===== ") == 2 and "training stopped (deadline)" in log
    assert "plan: unpack ~0.0s + training: 1 wave of up to 2 kernels x 21.0s" in capsys.readouterr().out


def test_smoke_throughput_probe_writes_its_table(tmp_path):
    out = tmp_path / "out"
    assert gpu_protocol.main(["--smoke", "--throughput", "--batches", "16", "--compile-modes", "off",
                              "--probe-seconds", "20", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    assert sorted(os.listdir(out)) == ["throughput.json", "throughput.log", "throughput.md"]
    probe, = json.loads((out / "throughput.json").read_text())["probes"]
    assert probe["batch_size"] == 16 and probe["compile"] is False and probe["returncode"] == 0
    assert probe["images_per_s"] > 0 and probe["ms_per_round"] > 0 and probe["first_round_s"] > 0
    assert re.search(r"^\| 16 \| off \| \d+ \| [0-9.]+ \| [0-9.]+ \| \d+ \|  \|$", (out / "throughput.md").read_text(), re.M)


def test_sigterm_stops_every_kernel_and_still_writes_the_results(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--smoke", "--minutes", "2", "--out", str(out),
                                "--work", str(tmp_path / "work")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    pids, lines = [], []
    for line in process.stdout:
        lines.append(line)
        pids += [int(pid) for pid in re.findall(r"^\[protocol\] started \S+ \(pid (\d+)\)", line)]
        if len(pids) == 2:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    lines += process.stdout.readlines()
    assert process.wait(timeout=60) == 130, "".join(lines)[-3000:]
    for pid in pids:  # every kernel has ended (and was reaped by the protocol)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    results = json.loads((out / "results.json").read_text())
    assert [v["note"] for v in results["variants"]] == ["stopped by SIGTERM"] * 2
    assert "fid" not in results["variants"][0]  # no scoring after a stop
    assert (out / "table.md").exists() and (out / "contact_sheet.png").exists()


def test_contact_sheet_labels_each_grid_and_greys_out_a_missing_one(tmp_path):
    grid = tmp_path / "latest.png"
    Image.new("RGB", (530, 530), (255, 0, 0)).save(grid)
    png = gpu_protocol.contact_sheet_png([("a   FID 99.5", str(grid)), ("b   FID –", None),
                                          ("c", str(tmp_path / "absent.png"))], columns=2)
    (tmp_path / "sheet.png").write_bytes(png)
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size == (2 * 530, 2 * (530 + 28))
        assert sheet.getpixel((265, 28 + 265)) == (255, 0, 0)           # a's grid under its label
        assert sheet.getpixel((530 + 265, 28 + 265)) == (160, 160, 160)  # b: no grid
        assert sheet.getpixel((265, 558 + 28 + 265)) == (160, 160, 160)  # c: its file does not exist
        assert sheet.getpixel((530 + 265, 558 + 265)) == (255, 255, 255)  # the empty fourth cell
        assert sheet.crop((0, 0, 530, 28)).convert("L").getextrema()[0] < 100  # a label was drawn
