"""setup.sh on a clean home: installs, is harmless twice, and uninstalls only its own files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def setup_sh(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The core only: the web extra that setup.sh adds by default (plotly and the rest,
    # ~18 s more to install here) is the test extra's too, installed for the whole suite.
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "TQ_SETUP_EXTRAS": "",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "LANG": os.environ.get("LANG", "C.UTF-8")}
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE",
                "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "PYTHON"):
        if var in os.environ:
            env[var] = os.environ[var]
    return subprocess.run(["bash", str(ROOT / "setup.sh"), *args], env=env, text=True,
                          capture_output=True, timeout=600)


@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK) and
                    not os.access("/usr/local/bin/python3", os.X_OK),
                    reason="needs a system python3")
def test_setup_installs_runs_and_uninstalls(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    foreign = home / ".local" / "bin" / "other-tool"
    foreign.write_text("#!/bin/sh\n")
    p = setup_sh(home)
    assert p.returncode == 0, p.stderr
    assert "is not on your PATH" in p.stdout and 'export PATH="' in p.stdout
    # Only the tool's own lines: no build warnings (setuptools once printed 40 lines
    # about git_tq.completion on every install).
    noise = [ln for ln in (p.stdout + p.stderr).splitlines()
             if "warning" in ln.lower() or "Package" in ln]
    assert not noise, "\n".join(noise)
    link = home / ".local" / "bin" / "git-tq"
    page = home / ".local" / "share" / "man" / "man1" / "git-tq.1"
    assert link.is_file() and os.access(link, os.X_OK) and page.exists()
    assert "import re" not in link.read_text()  # pip's script imports it before anything
    # git finds the subcommand through PATH
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "HOME": str(home), "TQ_HOME": str(tmp_path / "tqh"),
           "PATH": f"{link.parent}:/usr/bin:/bin"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    out = subprocess.run(["git", "tq", "run", "-q", "--cpu", "true"], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    # and man finds the page from PATH (man-db maps ~/.local/bin to ~/.local/share/man)
    if shutil.which("man"):
        man = subprocess.run(["man", "-w", "git-tq"], env=env, capture_output=True, text=True)
        assert man.stdout.strip() == str(page), man.stderr
    assert setup_sh(home).returncode == 0  # twice is harmless
    assert link.is_file() and "setup.sh" in link.read_text()
    p = setup_sh(home, "--uninstall")
    assert p.returncode == 0, p.stderr
    assert not link.exists() and not page.exists()
    assert not (home / ".local" / "share" / "git-tq").exists()
    assert not (home / ".local" / "share" / "man").exists()  # we made it, so we removed it
    assert foreign.exists() and (home / ".local" / "bin").is_dir()  # not ours: kept
    assert "nothing to uninstall" in setup_sh(home, "--uninstall").stdout


def test_setup_rejects_unknown_options(tmp_path: Path) -> None:
    p = setup_sh(tmp_path, "--bogus")
    assert p.returncode == 1 and "unknown option --bogus" in p.stderr
