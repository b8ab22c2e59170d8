"""The benchmark: suites of pretrained and fine-tuned models, a runner that merges with every method and
evaluates, and reports (``jaxmerge bench``).

The offline suite (:mod:`jaxmerge.bench.suite`) builds a tiny CLIP, zero-shot heads and eight experts on
procedural and scikit-learn images in minutes on a laptop CPU, and caches them. Methods that need data plug
into the runner with :func:`register_runner` (TTA, validation or auxiliary data) or :func:`register_adapter`
(pre-merge adaptations such as Resolving Interference).
"""

from jaxmerge.bench.command import SUITES as SUITES
from jaxmerge.bench.command import build_suite as build_suite
from jaxmerge.bench.report import write_reports as write_reports
from jaxmerge.bench.runner import Suite as Suite
from jaxmerge.bench.runner import register_adapter as register_adapter
from jaxmerge.bench.runner import register_runner as register_runner
from jaxmerge.bench.runner import resolve_methods as resolve_methods
from jaxmerge.bench.runner import run_suite as run_suite
from jaxmerge.bench.suite import OfflineConfig as OfflineConfig
from jaxmerge.bench.suite import OfflineSuite as OfflineSuite
from jaxmerge.bench.suite import build_offline_suite as build_offline_suite
