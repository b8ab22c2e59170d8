"""mergekit compatibility: mergekit 0.1.5's methods (:mod:`jaxmerge.mk.kernels`), its per-tensor parameter
resolution (:mod:`jaxmerge.mk.params`) and a tensor-by-tensor engine (:mod:`jaxmerge.mk.engine`) that
:mod:`jaxmerge.config` builds for configs in mergekit's schema."""

from jaxmerge.mk.engine import Plan, merge_arrays, run
from jaxmerge.mk.params import METHODS, Resolver, layer_t

__all__ = ["METHODS", "Plan", "Resolver", "layer_t", "merge_arrays", "run"]
