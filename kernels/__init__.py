"""obs_compress_kernels: Triton kernels for OBS, each with its pure-torch reference.

Installed as the import package ``obs_compress_kernels`` (from the repository's
``kernels/`` folder). Never imports ``obs_compress``.
"""

from ._backend import BACKENDS, resolve_backend
from .greedy_obs import GreedyObsResult, greedy_obs, greedy_obs_torch

__all__ = ["BACKENDS", "GreedyObsResult", "greedy_obs", "greedy_obs_torch", "resolve_backend"]
