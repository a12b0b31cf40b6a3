"""Pure tensor math of OBS: Hessians, inverses, saliencies, masks. Imports only torch."""

from .hessian import Curvature, HessianAccumulator, RecursiveInverseAccumulator
from .inverse import PreparedCurvature, prepare_curvature, recursive_inverse, woodbury_downdate_
from .masks import Pattern, parse_pattern

__all__ = ["Curvature", "HessianAccumulator", "Pattern", "PreparedCurvature",
           "RecursiveInverseAccumulator", "parse_pattern", "prepare_curvature",
           "recursive_inverse", "woodbury_downdate_"]
