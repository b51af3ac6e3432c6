"""guidellm (vLLM's benchmark tool) for the tests, in a virtualenv of its own: ``.venv-guidellm``.

guidellm pins click ~8.4 and, through sanic, multidict < 7 — older than what the project's venv
holds — so installing it there would downgrade packages the gateway uses. Its heavy dependencies
(torch, transformers, numpy, pydantic, httpx) are already in the project's venv, though. So
``.venv-guidellm`` is an overlay: a venv whose own site-packages come first, followed by the
project's venv's (a ``.pth`` file adds them), and pip installs into it only what guidellm needs
beyond those — pandas, pyarrow, datasets, sanic, the older click and multidict (~300 MB, about a
minute and a half on the 2-core machine with pip's cache cold). pip never removes the project's
copies: they are outside the environment it installs into.

``python -m tests.guidellm_env`` (run by ``make test``) builds it once; ``ensure()`` (the test
fixture) is a no-op when it is built for this guidellm and this project venv.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.procs import ROOT

GUIDELLM = "guidellm==0.8.1"
VENV = ROOT / ".venv-guidellm"


def ensure(venv: Path = VENV) -> Path:
    """The ``guidellm`` command of a built overlay venv (built here if missing or stale)."""
    base = sysconfig.get_paths()["purelib"]  # the project's venv: the interpreter running us
    stamp_text = f"{GUIDELLM}\n{base}\n"
    stamp = venv / ".installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build it once
        if not (stamp.is_file() and stamp.read_text() == stamp_text):
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            site = Path(
                subprocess.run(
                    [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
            )
            # addsitedir (not a bare path) so that the project venv's own .pth files are read too
            (site / "zz_project_venv.pth").write_text(f"import site; site.addsitedir({base!r})\n")
            pip = [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-warn-conflicts",
            ]
            subprocess.run([*pip, GUIDELLM], check=True)
            stamp.write_text(stamp_text)
    return venv / "bin" / "guidellm"


if __name__ == "__main__":
    print(ensure())
