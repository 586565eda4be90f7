"""A manifest of a work tree: {path: what is there}, `.git` entries left out.

Standalone (standard library only): the tests copy it into each repository as
`tq_dump.py`, jobs run that copy (`python tq_dump.py OUT [ROOT]`, ROOT defaulting
to $TQ_WORKTREE), and the tests import it to take the same manifest of the
user's tree. Values:

- a file: its sha256, plus " x" when executable;
- a symlink that stays in the tree: "link:" + its target as written;
- a symlink that leaves the tree (absolute, or relative through ".."): "out:" +
  what it reaches (the job's copy of such a link is rewritten to an absolute
  path, so the content it reaches is what must match);
- an empty folder: "empty-dir";
- "__cwd__": the working directory relative to ROOT.

Paths are bytes on disk, shown with non-UTF-8 bytes as \\xNN escapes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys


def show(rel: bytes) -> str:
    return rel.decode("utf-8", "backslashreplace")


def file_digest(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def reached(path: bytes) -> str:
    """What a link leaving the tree reaches: a file's digest, a folder's manifest's."""
    if os.path.isdir(path):
        data = json.dumps(manifest(path, path), sort_keys=True).encode()
        return "dir " + hashlib.sha256(data).hexdigest()
    if os.path.isfile(path):
        return "file " + file_digest(path)
    return "missing"


def _leaves(rel: bytes, target: bytes) -> bool:
    if os.path.isabs(target):
        return True
    resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    return resolved == b".." or resolved.startswith(b"../")


def manifest(root: bytes | str, cwd: bytes | str | None = None) -> dict[str, str]:
    root_b = os.fsencode(os.path.abspath(root))
    out: dict[str, str] = {}

    def walk(rel: bytes) -> None:
        here = os.path.join(root_b, rel) if rel else root_b
        names = sorted(n for n in os.listdir(here) if n != b".git")
        if not names and rel:
            out[show(rel) + "/"] = "empty-dir"
        for name in names:
            sub = os.path.join(rel, name) if rel else name
            full = os.path.join(root_b, sub)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                if _leaves(sub, target):
                    out[show(sub)] = "out:" + reached(full)
                else:
                    out[show(sub)] = "link:" + show(target)
            elif stat.S_ISDIR(st.st_mode):
                walk(sub)
            elif stat.S_ISREG(st.st_mode):
                x = " x" if st.st_mode & stat.S_IXUSR else ""
                out[show(sub)] = file_digest(full) + x
            else:
                out[show(sub)] = "special"

    walk(b"")
    if cwd is not None:
        out["__cwd__"] = show(os.path.relpath(os.fsencode(os.path.abspath(cwd)), root_b))
    return out


def main() -> None:
    target = sys.argv[1]
    root = sys.argv[2] if len(sys.argv) > 2 else os.environ["TQ_WORKTREE"]
    data = manifest(root, os.getcwd())
    tmp = target + ".part"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, sort_keys=True, indent=1)
    os.replace(tmp, target)


if __name__ == "__main__":
    main()
