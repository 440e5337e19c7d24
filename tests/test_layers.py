"""The layers stay layers: ``mardini`` (the library) imports neither ``pipelines`` nor
``data_prep``; ``data_prep`` uses only the library's data, storage and media modules (never
training, models or evaluation); ``pipelines`` sits on top and assembles the ``mardini`` command.
Inside the library, what uses a trained model (export, generation, evaluation, serving) does not
depend on the trainer (``mardini.train``: DeepSpeed, torch.distributed).

Every import statement counts, also the ones inside functions: a lazy import is still a
dependency. A second check imports every ``data_prep`` module in a fresh interpreter and looks
at what came in with them, so an allowed module that pulls in training is caught too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What data_prep may import from the library.
DATA_PREP_MAY_USE = ("mardini.storage", "mardini.data", "mardini.video", "mardini.x264")
# What must not come in, even transitively, with data_prep.
NOT_WITH_DATA_PREP = ("mardini.train", "mardini.models", "mardini.eval", "mardini.generate",
                      "deepspeed", "pipelines", "prefect", "mlflow")  # fmt: skip


def _imports(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, relative imports resolved against its package
    (by default the one its place in the repository says)."""
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
    return found


def _files(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return files


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_library_imports_nothing_above_it():
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in _files("mardini")
        for line, module in _imports(path)
        if _within(module, ("pipelines", "data_prep"))
    ]
    assert bad == []


# Library modules that use a trained model without training one.
USES_A_MODEL = ("mardini.export", "mardini.generate", "mardini.eval", "mardini.mlflow_model",
                "mardini.video", "mardini.mlflow_setup")  # fmt: skip


def test_what_uses_a_model_does_not_depend_on_the_trainer():
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in _files("mardini")
        if _within(".".join(path.relative_to(REPO).with_suffix("").parts), USES_A_MODEL)
        for line, module in _imports(path)
        if _within(module, ("mardini.train",))
    ]
    assert bad == []


def test_data_prep_uses_only_the_librarys_data_and_storage_modules():
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in _files("data_prep")
        for line, module in _imports(path)
        if (_within(module, ("mardini",)) and not _within(module, DATA_PREP_MAY_USE))
        or _within(module, ("pipelines",))
    ]
    assert bad == []


def test_the_rules_see_lazy_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function and a relative one are found."""
    sample = tmp_path / "probe.py"
    sample.write_text("def f():\n    from pipelines import cli\n\nfrom .train import engine\n")
    assert {module for _, module in _imports(sample, "mardini")} == {"pipelines", "mardini.train"}


@pytest.mark.parametrize("package", ["data_prep"])
def test_importing_data_prep_brings_no_training_along(package):
    modules = [
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in _files(package)
        if p.name != "__main__.py"
    ]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if _within(m, NOT_WITH_DATA_PREP)] == []
