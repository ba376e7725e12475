"""How a results file was made: device, versions, commit, date and command.

Every file under ``results/`` carries ``{"provenance": collect(), ...}`` so that a number can be
traced back to the machine and the code that produced it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["collect", "commit_of", "git_commit", "repo_root", "results_dir", "figures_dir", "write_json_atomic"]

_REPO = Path(__file__).resolve().parent.parent


def repo_root() -> Path:
    """The repository root: the folder holding ``mustafar/``, ``csrc/``, ``results/`` and ``figures/``."""
    return _REPO


def results_dir() -> Path:
    """``<repo>/results``: every measurement file (JSON/CSV with provenance); superseded ones in ``archive/``."""
    return _REPO / "results"


def figures_dir() -> Path:
    """``<repo>/figures``: every figure (PNG + PDF), named after its notebook."""
    return _REPO / "figures"


def git_commit() -> dict:
    """Commit hash of the working tree and whether it had uncommitted changes ("dirty").

    Where the tree is a copy without ``.git`` (the GPU machine gets a copy of the working tree), the
    caller passes the commit in the environment: ``MUSTAFAR_GIT_COMMIT=$(git rev-parse HEAD)``.
    """
    env = os.environ.get("MUSTAFAR_GIT_COMMIT")
    if env:
        return {"commit": env, "dirty": None, "source": "MUSTAFAR_GIT_COMMIT"}
    def _git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = _git("rev-parse", "--verify", "-q", "HEAD") or None
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def collect(command: str | None = None) -> dict:
    """Provenance record for a results file.

    Parameters
    ----------
    command : str, optional
        The command that produced the results; defaults to ``python -m ... argv``.

    Returns
    -------
    dict
        ``device`` (GPU name or CPU model), ``host``, ``python``, ``torch``, ``cuda``,
        ``transformers``, ``mustafar`` versions, ``git`` commit/dirty flag, UTC ``date`` and
        ``command``.
    """
    import torch

    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        tf_version = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            driver = None
    else:
        device = _cpu_name()
        driver = None
    from mustafar import __version__ as mustafar_version

    return {
        "device": device,
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": driver,
        "transformers": tf_version,
        "mustafar": mustafar_version,
        "git": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def commit_of(prov: dict) -> str | None:
    """The git commit recorded in a provenance block, in either layout this project has written
    (``{"git": {"commit": ...}}`` from :func:`collect`, or a flat ``"git_commit"``)."""
    git = prov.get("git")
    if isinstance(git, dict) and git.get("commit"):
        return git["commit"]
    return prov.get("git_commit", prov.get("commit"))


def write_json_atomic(obj, path, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (a temp file beside it, then ``os.replace``), so a
    reader or a resumed run never sees a half-written results file. Creates the folder."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)
    return path
