"""tools/setup_env.sh: what is installed is checked first, so a second run installs nothing.

The script runs for real, in a copy of the checkout, on a virtual environment whose packages
are this test run's own (its site-packages listed in a ``.pth`` file) and whose ``pip``
only records what it is asked to do; for an editable install it leaves what pip leaves: the
package's metadata naming the checkout (``direct_url.json``).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RECORDING_PIP = '''
import json
import os
import sys
from pathlib import Path

with open(os.environ["RECORDED_PIP_CALLS"], "a", encoding="utf-8") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if "-e" in sys.argv:
    info = Path(__file__).resolve().parents[1] / "obs_compress-0.1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\\nName: obs-compress\\n"
                                   "Version: 0.1.0\\n")
    (info / "direct_url.json").write_text(json.dumps(
        {"url": Path.cwd().resolve().as_uri(), "dir_info": {"editable": True}}))
'''


def make_checkout(tmp_path: Path) -> tuple[Path, dict]:
    checkout = tmp_path / "checkout"
    (checkout / "tools").mkdir(parents=True)
    shutil.copy(REPO / "tools" / "setup_env.sh", checkout / "tools")
    shutil.copy(REPO / "pyproject.toml", checkout)
    venv = checkout / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (packages,) = venv.glob("lib/python*/site-packages")
    (packages / "this_test_run.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (packages / "pip").mkdir()
    (packages / "pip" / "__init__.py").write_text("")
    (packages / "pip" / "__main__.py").write_text(RECORDING_PIP)
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    env["RECORDED_PIP_CALLS"] = str(tmp_path / "pip-calls.txt")
    return checkout, env


def run_setup(checkout: Path, env: dict) -> str:
    done = subprocess.run(["bash", str(checkout / "tools" / "setup_env.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_second_setup_run_installs_nothing(tmp_path):
    checkout, env = make_checkout(tmp_path)
    calls = tmp_path / "pip-calls.txt"
    first = run_setup(checkout, env)
    # Torch, the pinned transformers and the model packages are there; the package is not
    # installed from this checkout yet, so that, and only that, is installed.
    assert "obs-compress: not installed in editable mode from this checkout" in first
    assert calls.read_text().splitlines() == ['install -q -e .[test] transformers==5.17.0']

    second = run_setup(checkout, env)
    assert "nothing to install" in second
    assert calls.read_text().splitlines() == ['install -q -e .[test] transformers==5.17.0']
