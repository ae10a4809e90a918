"""build_kernel.py: the bundle is deterministic, self-contained, committed fresh, and rejects unsafe sources."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import build_kernel

ROOT = Path(__file__).resolve().parents[1]


def write_sources(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_fresh_build_is_deterministic_and_equals_committed_kernel(tmp_path):
    out = tmp_path / "kernel.py"
    subprocess.run([sys.executable, "build_kernel.py", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    first = out.read_text()
    assert first == build_kernel.build(ROOT / "src")
    assert (ROOT / "kernel.py").read_text() == first, "kernel.py is stale: run `python build_kernel.py` and commit it"


def test_kernel_imports_only_allowed_packages():
    tree = ast.parse((ROOT / "kernel.py").read_text())
    allowed = {"torch", "torchvision", "numpy", "scipy", "PIL", "__future__"} | set(sys.stdlib_module_names)
    lazy_optional = {"matplotlib", "IPython"}  # imported inside functions, guarded by ImportError
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            roots = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else [(node.module or "").split(".")[0]]
            for root in roots:
                assert root != "src", f"line {node.lineno}: a project import survived bundling"
                if node in tree.body:
                    assert root in allowed, f"line {node.lineno}: top-level import of {root}"
                else:
                    assert root in allowed | lazy_optional, f"line {node.lineno}: import of {root}"


def test_kernel_is_readable_plain_python():
    text = (ROOT / "kernel.py").read_text()
    assert "base64" not in text and "exec(" not in text
    banners = [line for line in text.splitlines() if line.startswith("# src/")]
    assert "# src/main.py" in banners and len(banners) == len(set(banners))
    assert text.rstrip().endswith("entry_point()")


def test_name_clash_is_rejected(tmp_path):
    src = write_sources(tmp_path / "src", {
        "main.py": "from src.a import helper\n\ndef entry_point():\n    helper()\n",
        "a.py": "from src.b import other\n\ndef helper():\n    return other()\n",
        "b.py": "def other():\n    return 1\n\ndef helper():\n    return 2\n"})
    with pytest.raises(build_kernel.BundleError, match="'helper' is defined in both src/b.py and src/a.py"):
        build_kernel.build(src)


@pytest.mark.parametrize("source, message", [
    ("from .b import other\n", "relative import"),
    ("import src.b\n", "`import src...`"),
    ("from src.b import other as o\n", "cannot be bundled"),
    ("def f():\n    from src.b import other\n", "inside a block"),
    ("import pandas\n", "import of 'pandas'"),
    ("from src.b import missing\n", "which does not define it"),
])
def test_unsafe_sources_are_rejected(tmp_path, source, message):
    src = write_sources(tmp_path / "src", {"main.py": source, "b.py": "def other():\n    return 1\n"})
    with pytest.raises(build_kernel.BundleError, match=message):
        build_kernel.build(src)


def test_bundle_hoists_imports_and_drops_main_guards(tmp_path):
    src = write_sources(tmp_path / "src", {
        "main.py": '"""Entry."""\nimport os\nfrom src.b import other\n\ndef entry_point():\n    print(other())\n',
        "b.py": '"""Helper module.\n\nSecond line."""\nimport os\nimport json\n\ndef other():\n    return json.dumps(os.sep)\n\n'
                'if __name__ == "__main__":\n    print("cli")\n',
        "unused.py": "import pandas\n"})  # not reached from main: not bundled
    text = build_kernel.build(src)
    assert text.count("import os\n") == 1 and "import json" in text
    assert '"cli"' not in text and "pandas" not in text
    assert "# src/b.py\n# Helper module.\n#\n# Second line." in text
    assert text.index("# src/b.py") < text.index("# src/main.py")
    out = tmp_path / "k.py"
    out.write_text(text)
    result = subprocess.run([sys.executable, str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip() == '"/"'


def test_kernel_leaves_no_future_import_for_later_notebook_cells():
    """A notebook compiles each cell with the __future__ flags of the cells before it: kernel.py must set none."""
    import __future__
    import codeop
    import types
    text = (ROOT / "kernel.py").read_text()
    assert "from __future__" not in text
    cells = codeop.Compile()  # what IPython uses: it carries future flags from cell to cell
    kernel_code = cells(text, "<pasted kernel cell>", "exec")
    assert not cells.flags & __future__.annotations.compiler_flag
    later_cell = cells("def later(x: undefined_name): pass\n", "<later cell>", "exec")
    with pytest.raises(NameError, match="undefined_name"):  # annotations are evaluated again, as in a fresh notebook
        exec(later_cell, {})
    # and every definition of the bundle still runs without the import (its annotations are quoted)
    cell_module = types.ModuleType("pasted_kernel_cell")
    sys.modules[cell_module.__name__] = cell_module
    try:
        exec(kernel_code, cell_module.__dict__)
    finally:
        del sys.modules[cell_module.__name__]
    assert callable(cell_module.__dict__["entry_point"])


def test_annotations_are_quoted_unless_builtin(tmp_path):
    source = """from __future__ import annotations
import fractions
from dataclasses import dataclass


@dataclass
class Later:
    size: int | None = None
    parent: Later | None = None


def entry_point(x: fractions.Fraction = None, n: int = 3, *rest: Later, **named: dict[str, list[int]]) -> Later:
    local: Later = Later()
    return local
"""
    text = build_kernel.build(write_sources(tmp_path / "src", {"main.py": source}))
    assert "from __future__" not in text
    assert '    size: int | None = None\n    parent: "Later | None" = None\n' in text
    assert ('def entry_point(x: "fractions.Fraction" = None, n: int = 3, *rest: "Later", '
            '**named: dict[str, list[int]]) -> "Later":\n    local: "Later" = Later()') in text
    out = tmp_path / "k.py"
    out.write_text(text)
    # the dataclass's reference to itself would raise NameError unquoted
    result = subprocess.run([sys.executable, str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_annotations_after_non_ascii_text_are_quoted_in_place(tmp_path):
    src = write_sources(tmp_path / "src", {
        "main.py": 'from __future__ import annotations\n\ndef entry_point(label="größe", x: Thing = None) -> Thing:\n'
                   '    return x\n\nclass Thing:\n    pass\n'})
    assert 'def entry_point(label="größe", x: "Thing" = None) -> "Thing":' in build_kernel.build(src)


def test_other_future_imports_are_refused(tmp_path):
    src = write_sources(tmp_path / "src", {"main.py": "from __future__ import generator_stop\n"})
    with pytest.raises(build_kernel.BundleError, match="would leak into every later notebook cell"):
        build_kernel.build(src)


def test_pipeline_order_where_the_imports_allow_it(tmp_path):
    """Dependencies first; among modules free to go, the pipeline's order; then a table of contents in that order."""
    src = write_sources(tmp_path / "src", {
        "main.py": '"""The pipeline."""\nfrom src.train import fit\nfrom src.data import load\n',
        "train.py": '"""Training."""\nfrom src.models import G\nfrom src.config import C\nfit = 1\n',
        "models.py": '"""Models."""\nfrom src.config import C\nG = 1\n',
        "data.py": '"""Data."""\nfrom src.config import C\nload = 1\n',
        "config.py": '"""Settings."""\nC = 1\n',
    })
    assert build_kernel.bundle_order(build_kernel.load_modules(src)) == ["config", "data", "models", "train", "main"]
    text = build_kernel.build(src)
    table = text.split("# Contents, in pipeline order")[1].split("\n\n")[0]
    contents = [line.split()[1] for line in table.splitlines() if line.startswith("#   ")]
    assert contents == ["config", "data", "models", "train", "main"]


def test_each_module_is_imported_once_with_every_name_it_needs():
    tree = ast.parse((ROOT / "kernel.py").read_text())
    plain = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    modules_from = [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert len(plain) == len(set(plain)) and len(modules_from) == len(set(modules_from))
    assert build_kernel.merge_imports(["from dataclasses import dataclass", "import os",
                                       "from dataclasses import dataclass, field", "import os"]) == \
        ["import os", "from dataclasses import dataclass, field"]
