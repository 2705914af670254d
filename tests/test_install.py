"""A user's script beside a clone still imports the installed package.

A clone is a folder named depthcut without __init__.py. A script run from the folder that holds
it has that folder on sys.path first, so Python's path scan sees the clone as a namespace
package; only a regular package found in the same scan wins over it. scripts/setup.sh
therefore installs in setuptools' compat editable mode (the repository root on sys.path through
a .pth file); the default strict mode's import finder runs after the scan and loses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "import depthcut\nprint(depthcut.__file__)\nprint(depthcut.find_sites.__name__)\n"


def script_beside_a_clone(tmp_path: Path) -> Path:
    """tmp/depthcut (the repository root, as a clone) and tmp/script.py beside it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "depthcut").symlink_to(REPO, target_is_directory=True)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    return script


def run_script(python: str | Path, script: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), script.name], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=120)


def strict_editable_install() -> bool:
    """Whether depthcut is installed here through setuptools' strict editable finder."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    return any(purelib.glob("__editable___depthcut_*_finder.py"))


def test_a_script_beside_a_clone_imports_the_installed_package(tmp_path):
    if strict_editable_install():
        pytest.skip("depthcut is installed here in setuptools' strict editable mode (pip "
                    "install -e without editable_mode=compat), which a clone folder shadows: "
                    "rerun scripts/setup.sh; test_setup_installs_a_package_no_clone_shadows "
                    "checks setup.sh's mode in a throwaway environment")
    done = run_script(sys.executable, script_beside_a_clone(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "find_sites"


def test_setup_installs_a_package_no_clone_shadows(tmp_path):
    """setup.sh's editable install, into a throwaway venv that borrows this interpreter's
    packages (torch) through .pth path lines (which do not run the .pth files there)."""
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "--config-settings editable_mode=compat" in setup
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    borrowed = [entry for entry in sys.path if entry and Path(entry).is_dir()
                and Path(entry).resolve() != REPO]
    (Path(purelib) / "borrowed.pth").write_text("\n".join(borrowed) + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check",
         "-e", str(REPO), "--config-settings", "editable_mode=compat"],
        capture_output=True, text=True, timeout=300)
    if installed.returncode != 0 and "no such option: --python" in installed.stderr:
        pytest.skip("this pip cannot install into another environment (pip >= 22.3 can)")
    assert installed.returncode == 0, installed.stderr
    done = run_script(python, script_beside_a_clone(tmp_path / "work"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "find_sites"
    assert Path(done.stdout.split()[0]).resolve() == REPO / "depthcut" / "__init__.py"
