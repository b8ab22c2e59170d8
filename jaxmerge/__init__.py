"""jaxmerge: model merging in JAX.

Merge methods are composable, jit-compiled pytree transformations (``MergeTransform``, optax's shape)::

    import jaxmerge as jm
    tx = jm.get_method("ties")(density=0.2, scale=0.3)
    merged = jm.merge(tx, pretrained, [finetuned_a, finetuned_b])

The core imports only jax, numpy and jaxtyping. Models (``jaxmerge.models``), checkpoints (``jaxmerge.io``),
evaluation (``jaxmerge.eval``), data (``jaxmerge.data``) and the benchmark (``jaxmerge.bench``) are imported
explicitly.
"""

from jaxmerge import filters as filters
from jaxmerge import linalg as linalg
from jaxmerge import reductions as reductions
from jaxmerge import stats as stats
from jaxmerge import transforms as transforms
from jaxmerge import tree as tree
from jaxmerge import alias as alias
from jaxmerge.tta import methods as _tta_methods  # registers fisher, regmean, adamerging (no optax import)
from jaxmerge import alias_subspace as alias_subspace
from jaxmerge.base import EmptyCoeffs as EmptyCoeffs
from jaxmerge.base import MergeContext as MergeContext
from jaxmerge.base import MergeTransform as MergeTransform
from jaxmerge.base import across_tasks as across_tasks
from jaxmerge.base import per_leaf as per_leaf
from jaxmerge.base import per_task as per_task
from jaxmerge.combine import chain as chain
from jaxmerge.combine import masked as masked
from jaxmerge.combine import named_chain as named_chain
from jaxmerge.combine import partition as partition
from jaxmerge.engine.merge import make_merger as make_merger
from jaxmerge.engine.merge import merge as merge
from jaxmerge.engine.merge import merge_per_task as merge_per_task
from jaxmerge.engine.merge import route as route
from jaxmerge.registry import MethodInfo as MethodInfo
from jaxmerge.registry import get_method as get_method
from jaxmerge.registry import list_methods as list_methods
from jaxmerge.registry import method_info as method_info

__version__ = "0.1.0"
