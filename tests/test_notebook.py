"""kernel.py pasted into a notebook cell (an IPython shell, which compiles cells as Jupyter does): flags from sys.argv
with Jupyter's own -f, --help and a misspelt flag without SystemExit noise, and nothing leaking into later cells."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NOTEBOOK = r'''
import json, sys
from IPython.core.interactiveshell import InteractiveShell

kernel_text, out_dir = open(sys.argv[1]).read(), sys.argv[2]
shell = InteractiveShell.instance()
results = {}

def cell(name, code):
    result = shell.run_cell(code)
    error = result.error_before_exec or result.error_in_exec
    results[name] = None if error is None else f"{type(error).__name__}: {error}"

cell("inline backend", "import matplotlib; matplotlib.use('svg')")  # stands for the notebook's inline backend
jupyter = "['/opt/conda/lib/python3.10/site-packages/ipykernel_launcher.py', '-f', '/root/kernel-1.json']"
cell("help argv", f"import sys; sys.argv = {jupyter} + ['--help']")
cell("kernel --help", kernel_text)
cell("misspelt argv", f"import sys; sys.argv = {jupyter} + ['--time-buget', '60s']")
cell("kernel misspelt", kernel_text)
cell("report argv", f"import sys; sys.argv = {jupyter} + ['--report', {out_dir!r}]")
cell("kernel --report", kernel_text)
cell("later annotation", "def later(x: undefined_name): pass")
cell("backend after", "import matplotlib; backend_after = matplotlib.get_backend()")
results["backend"] = shell.user_ns.get("backend_after")
print("RESULTS " + json.dumps(results))
'''


@pytest.mark.skipif(importlib.util.find_spec("IPython") is None, reason="IPython is not installed")
def test_pasted_kernel_cell_behaves_and_leaves_the_notebook_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stats.jsonl").write_text(json.dumps({"time": 1.0, "step": 1, "kimg": 0.1, "g_loss": 1.0, "d_loss": 1.0})
                                     + "\n")
    script = tmp_path / "notebook.py"
    script.write_text(NOTEBOOK)
    result = subprocess.run([sys.executable, str(script), str(ROOT / "kernel.py"), str(out)], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULTS ", 1)[1])
    output = result.stdout + result.stderr
    # each pasted run ends normally: no SystemExit (IPython would print "An exception has occurred, use %tb ...")
    for name in ("kernel --help", "kernel misspelt", "kernel --report"):
        assert results[name] is None, (name, results[name])
    assert "SystemExit" not in output and "%tb" not in output
    assert "usage: kernel.py [-h]" in result.stdout
    assert "kernel.py: error: unrecognized arguments: --time-buget 60s" in result.stderr
    assert "[dogkernel] finished with exit code 2" in result.stdout
    assert (out / "plots.png").exists()
    # nothing leaks into the cells after it: annotations are evaluated again, the backend is the notebook's
    assert results["later annotation"] == "NameError: name 'undefined_name' is not defined"
    assert results["backend"] == "svg"
