"""Job environments: activating a virtualenv or conda prefix, or a conda env by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping

from git_tq.errors import TqError


def conda_prefix(name: str, env: Mapping[str, str]) -> str:
    """The prefix of the conda environment `name`, asking conda, mamba or micromamba."""
    path = env.get("PATH", os.defpath)
    for tool in ("conda", "mamba", "micromamba"):
        exe = shutil.which(tool, path=path)
        if not exe:
            continue
        p = subprocess.run([exe, "env", "list", "--json"], capture_output=True, env=dict(env),
                           timeout=30)
        if p.returncode != 0:
            continue
        try:
            prefixes = json.loads(p.stdout)["envs"]
        except (ValueError, KeyError):
            continue
        for prefix in prefixes:
            if os.path.basename(prefix) == name or (name == "base" and prefix == prefixes[0]):
                return str(prefix)
    raise TqError(f"conda environment {name!r} not found (no conda, mamba or micromamba "
                  "knows it); give -e a path instead")


def activate(spec: str, env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the environment `spec` (a path or a conda env name) activated."""
    prefix = spec if os.sep in spec else conda_prefix(spec, env)
    if not os.path.isdir(prefix):
        raise TqError(f"environment {prefix} does not exist")
    result = dict(env)
    result["PATH"] = os.path.join(prefix, "bin") + os.pathsep + env.get("PATH", os.defpath)
    result.pop("PYTHONHOME", None)
    if os.path.isdir(os.path.join(prefix, "conda-meta")):
        result["CONDA_PREFIX"] = prefix
        result["CONDA_DEFAULT_ENV"] = os.path.basename(prefix)
    else:
        result["VIRTUAL_ENV"] = prefix
    return result
