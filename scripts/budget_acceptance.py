"""Issue 20's budget acceptance, run as a new user would: each command one after another, then one table.

    python scripts/budget_acceptance.py                       # everything (~25 min on 2 idle cores)
    python scripts/budget_acceptance.py --only b90,biggan     # some rows (b90, a recipe name, full)

The commands, on the small real data (the dev pack's first 240 photos, unpacked to --data if missing):
  b90     kernel.py --g-ch 16 --d-ch 16 --time-budget 90s: a valid zip, the run ends between 80 and 93 s
  RECIPE  kernel.py --recipe RECIPE --g-ch 16 --d-ch 16 --time-budget 2m, for every recipe: ends in 105..123 s
  full    kernel.py --time-budget 90s (the full-width default): refused in one line naming a budget; then that
          budget: a valid zip, ending within it (+3 s, the promised grace)

"End" is the run's own clock (its `done in` line: from main() to the end, Python's start-up excluded, as the budget
counts); "wall" is the whole process. Estimates: the reserve's images figure at start-up and after the recheck
near the end of training; "real" is the run's own generate + zip. The load average is printed with each row: the
bounds hold on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from src.config import parse_duration  # noqa: E402
from src.mifid import validate_submission  # noqa: E402

RECIPES = ("dcgan", "cgan", "acgan", "sngan", "sagan", "biggan")
NARROW = ["--g-ch", "16", "--d-ch", "16"]
GRACE_S = 3.0


def ensure_data(data_dir: str, pack: str) -> None:
    if os.path.isdir(os.path.join(data_dir, "all-dogs")):
        return
    print(f"unpacking {pack} to {data_dir}", flush=True)
    os.makedirs(data_dir, exist_ok=True)
    with tarfile.open(pack) as archive:
        archive.extractall(data_dir)


def run_kernel(flags: list[str], log_path: str) -> dict:
    """Run kernel.py with flags; returns exit code, wall seconds, stdout (each line prefixed with the seconds since
    the process started), stderr. Everything is also written to log_path."""
    command = [sys.executable, os.path.join(REPO, "kernel.py"), *flags]
    start = time.time()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [f"{time.time() - start:7.2f} {line}" for line in proc.stdout]
    err = proc.stderr.read()
    code = proc.wait()
    wall = time.time() - start
    with open(log_path, "w") as f:
        f.write(" ".join(command) + f"\n# exit {code}, wall {wall:.1f}s\n" + "".join(lines) + err)
    return {"code": code, "wall": wall, "out": "".join(lines), "err": err, "command": "kernel.py " + " ".join(flags)}


def first_duration(pattern: str, text: str) -> float | None:
    found = re.search(pattern, text)
    return parse_duration(found.group(1)) if found else None


def line_time(pattern: str, out: str) -> float | None:
    """Seconds since the process started at the first line matching pattern."""
    found = re.search(r"^ *([\d.]+) .*" + pattern, out, re.MULTILINE)
    return float(found.group(1)) if found else None


def figures(result: dict, budget_s: float) -> dict:
    """From a run's log: the images estimate (start-up, recheck), the real generate + zip, the end (its own clock),
    and the end of training's estimate against what it took (from where the training window ended to the
    generation's start; main() starts at about the first line)."""
    out = result["out"]
    real = re.search(r"\(generate ([\d.]+)s, zip ([\d.]+)s", out)
    reserve = first_duration(r"reserving (\S+) \(images", out)
    change = re.search(r"the training window (gains|loses) ([\d.]+)s", out)
    if reserve is not None and change:
        reserve -= float(change.group(2)) * (1 if change.group(1) == "gains" else -1)
    main_start, output_start = line_time(r"\[main\] dogkernel:", out), line_time(r"\[main\] generating", out)
    tail_real = (output_start - main_start - (budget_s - reserve)
                 if None not in (reserve, main_start, output_start) else None)
    return {"estimate": first_duration(r"reserving \S+ \(images (\S+?),", out),
            "recheck": first_duration(r"output measured again with the trained G_ema: images (\S+) ", out),
            "real": float(real.group(1)) + float(real.group(2)) if real else None,
            "tail": first_duration(r"end of training (\S+?),", out), "tail_real": tail_real,
            "end": first_duration(r"\[main\] done in (\S+) of", out)}


def zip_is_valid(out_dir: str) -> bool:
    try:
        validate_submission(os.path.join(out_dir, "images.zip"))
        return True
    except Exception as error:  # any reason the submission is not one: the row fails
        print(f"  {out_dir}/images.zip is not a valid submission: {error}", flush=True)
        return False


def seconds_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def timed_row(name: str, flags: list[str], low: float, high: float, args) -> dict:
    out_dir = os.path.join(args.out, name)
    load = os.getloadavg()[0]
    result = run_kernel([*flags, "--out", out_dir], os.path.join(args.out, f"{name}.log"))
    budget_s = parse_duration(flags[flags.index("--time-budget") + 1])
    row = {**figures(result, budget_s), "name": name, "command": result["command"], "wall": result["wall"], "load": load}
    valid = result["code"] == 0 and zip_is_valid(out_dir)
    row["pass"] = valid and row["end"] is not None and low <= row["end"] <= high
    row["bounds"] = f"{low:.0f}..{high:.0f}"
    return row


def refusal_rows(args) -> list[dict]:
    """The full-width default at 90 s: refused in one line naming a budget; then that budget must work."""
    flags = ["--data-dir", args.data, "--max-images", "240"]
    load = os.getloadavg()[0]
    result = run_kernel([*flags, "--time-budget", "90s", "--out", os.path.join(args.out, "full90")],
                        os.path.join(args.out, "full90.log"))
    lines = result["err"].strip().splitlines()
    named = re.search(r"give --time-budget (\S+) or more", result["err"])
    refused = {"name": "full 90s", "command": result["command"], "wall": result["wall"], "load": load,
               **figures(result, 90.0), "bounds": "refused, 1 line",
               "pass": result["code"] == 2 and len(lines) == 1 and named is not None}
    rows = [refused]
    if named:
        budget = named.group(1)
        rows.append(timed_row(f"full {budget}", [*flags, "--time-budget", budget], 0.0,
                              parse_duration(budget) + GRACE_S, args))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/dogs", help="the unpacked dev pack (Kaggle layout)")
    parser.add_argument("--pack", default=os.path.join(REPO, "..", "shared", "data", "dogs_dev.tar.gz"))
    parser.add_argument("--out", default="/tmp/budget_acceptance", help="OUT folders and logs of the runs")
    parser.add_argument("--only", default="", help="comma-separated rows: b90, recipe names, full")
    args = parser.parse_args()
    ensure_data(args.data, args.pack)
    os.makedirs(args.out, exist_ok=True)
    wanted = set(args.only.split(",")) if args.only else {"b90", *RECIPES, "full"}
    data = ["--data-dir", args.data, "--max-images", "240"]
    rows = []
    if "b90" in wanted:
        rows.append(timed_row("b90", [*data, *NARROW, "--time-budget", "90s"], 80.0, 93.0, args))
        print(rows[-1], flush=True)
    for recipe in RECIPES:
        if recipe in wanted:
            rows.append(timed_row(recipe, [*data, "--recipe", recipe, *NARROW, "--time-budget", "2m"], 105.0, 123.0,
                                  args))
            print(rows[-1], flush=True)
    if "full" in wanted:
        rows += refusal_rows(args)
        print(rows[-2:], flush=True)

    print(f"\n| row | command | load | images estimate s (start-up / recheck) | real output s | end of training "
          f"estimate / real s | end s | wall s | bounds | result |\n|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        command = row["command"].replace(f"--data-dir {args.data} --max-images 240 ", "")
        print(f"| {row['name']} | `{command}` | {row['load']:.1f} | {seconds_text(row['estimate'])} / "
              f"{seconds_text(row['recheck'])} | {seconds_text(row['real'])} | {seconds_text(row['tail'])} / "
              f"{seconds_text(row['tail_real'])} | {seconds_text(row['end'])} | {row['wall']:.1f} | {row['bounds']} | "
              f"{'pass' if row['pass'] else 'FAIL'} |")
    print(f"logs: {args.out}/*.log")
    sys.exit(0 if all(row["pass"] for row in rows) else 1)


if __name__ == "__main__":
    main()
