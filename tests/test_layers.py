"""The layering is kept honest: imports point down only, and the man page covers the CLI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click

from git_tq.cli import cli

PACKAGE = Path(__file__).resolve().parent.parent / "git_tq"
MAN = Path(__file__).resolve().parent.parent / "man" / "git-tq.1"

# Each module may import only modules of a strictly lower layer (or the same
# layer where listed), and nothing below the CLI may import click or rich.
LAYERS: list[set[str]] = [
    {"__main__"},
    {"entry"},
    {"console"},  # a thin modal layer that runs the CLI's own commands
    {"cli"},
    {"top", "web"},  # the dashboard · report and serve (the web stack, imported lazily)
    {"rows"},  # ready-to-print rows of ls and log, cached by tip
    {"output", "plotting"},  # CLI-side rendering (plotting: terminal curves, plotext)
    {"service"},
    {"submission"},  # `git tq run`: imported without the other actions
    {"joblists"},  # ids, ranges, tags, sweep names -> jobs
    {"context"},  # an opened repository, its store and tq home; the daemon's nudge
    {"daemon"},
    {"sharing"},  # push, fetch and the notes merge (the git CLI's own)
    {"slurmjob"},  # a Slurm batch job's payload on its node: runs the supervisor
    {"scheduler", "supervisor", "client", "server"},
    {"results"},  # what a run produced: outputs, metrics, its log
    {"metricfiles"},  # a job's metrics files read as points (JSON lines, CSV, TensorBoard)
    {"jobtree"},
    {"store", "snapshot"},
    {"localjobs", "pause"},  # the trust boundary: what this user submitted here · pause
    {"lifecycle", "recordfmt", "home", "gpus", "gitrepo", "procs", "envs", "deps", "origins",
     "backends", "slurm"},  # slurm: Slurm's command-line tools
    {"model", "errors", "safetext", "series", "__init__"},
]
UI_LIBRARIES = {"click", "rich", "prompt_toolkit"}
UI_MODULES = {"cli", "__main__", "entry", "output", "top", "console"}


def modules() -> list[tuple[str, Path]]:
    """Every source file with the module it belongs to: a package's files (git_tq/daemon/)
    are all that one module, its layer."""
    files = [(path.stem, path) for path in PACKAGE.glob("*.py")]
    files += [(path.parent.name, path) for path in PACKAGE.glob("*/*.py")
              if (path.parent / "__init__.py").exists()]
    return files


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if module in layer:
            return i
    raise AssertionError(f"module {module} is not placed in a layer: add it to LAYERS")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "git_tq":
                found.update(f"git_tq.{a.name}" for a in node.names
                             if (PACKAGE / f"{a.name}.py").exists()
                             or (PACKAGE / a.name / "__init__.py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_dependencies_point_down() -> None:
    for me, path in modules():
        mine = layer_of(me)
        for name in imports_of(path):
            top = name.split(".")[0]
            if me not in UI_MODULES:
                assert top not in UI_LIBRARIES, f"{me} imports {top}: only the CLI may"
            if top != "git_tq" or name == "git_tq":
                continue
            other = name.split(".")[1]
            if other == me:
                continue  # a package's files import each other
            assert layer_of(other) > mine, \
                f"{me} (layer {mine}) imports {other} (layer {layer_of(other)})"


def test_every_module_says_what_it_owns() -> None:
    for _, path in modules():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc) > 10, f"{path.relative_to(PACKAGE)} has no module docstring"


def test_the_man_page_documents_every_command_and_option() -> None:
    page = MAN.read_text()
    assert isinstance(cli, click.Group)
    for name, command in cli.commands.items():
        assert re.search(rf"git tq {re.escape(name)}\b", page), f"man page lacks `{name}`"
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in param.opts:
                    assert opt.replace("-", r"\-") in page or opt in page, \
                        f"man page lacks {opt} of {name}"
    for setting in ("tq.gpus", "tq.gpu", "tq.home"):
        assert setting in page


def test_the_scheduling_policy_imports_only_the_model() -> None:
    ours = {n for n in imports_of(PACKAGE / "scheduler.py") if n.startswith("git_tq")}
    assert ours == {"git_tq.model"}
