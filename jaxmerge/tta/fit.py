"""One optimization loop for every test-time adaptation: a single jitted, donating optax step."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.tta.adapter import Adapter

__all__ = ["fit", "make_step"]


@functools.lru_cache(maxsize=16)
def make_step(adapter: Adapter, tx: optax.GradientTransformation, loss: Callable[..., Any], *,
              has_aux: bool = False) -> Callable[..., Any]:
  """The compiled step ``(theta, opt_state, frozen, batch, key) -> (theta, opt_state, loss, aux)``.

  ``theta`` and ``opt_state`` are donated (their buffers are reused for the outputs); ``frozen`` is an
  argument, so large weights are never baked into the program as constants. Gradients are taken with respect
  to ``theta`` only.

  Args:
    adapter: the :class:`~jaxmerge.tta.adapter.Adapter` whose ``apply`` produces the loss's input.
    tx: the optax optimizer over ``theta``.
    loss: ``loss(out, batch) -> scalar`` (``-> (scalar, aux)`` with ``has_aux``).
    has_aux: the loss also returns an auxiliary pytree.

  Returns:
    The jitted step function (cached per arguments); ``aux`` is ``{}`` without ``has_aux``.
  """

  import optax  # noqa: PLC0415  (imported on use: ``import jaxmerge`` must not need optax)

  def objective(theta, frozen, batch, key):
    out = adapter.apply(theta, frozen, batch, key=key)
    res = loss(out, batch)
    return res if has_aux else (res, {})

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(theta, opt_state, frozen, batch, key):
    (value, aux), grads = jax.value_and_grad(objective, has_aux=True)(theta, frozen, batch, key)
    updates, opt_state = tx.update(grads, opt_state, theta)
    theta = optax.apply_updates(theta, updates)
    return theta, opt_state, value, aux

  return step


def fit(
    adapter: Adapter,
    frozen: Any,
    tx: optax.GradientTransformation,
    batches: Iterable[Any],
    loss: Callable[..., Any],
    *,
    key: jax.Array,
    steps: int,
    progress: bool = True,
    has_aux: bool = False,
    theta: Any = None,
    desc: str = "adapting",
) -> tuple[Any, dict[str, np.ndarray]]:
  """Trains ``theta = adapter.init(key, frozen)`` for ``steps`` optax steps.

  ``key`` is split into an initialization key and a loop key; step ``i`` draws the next element of
  ``batches`` and the key ``fold_in(loop_key, i)``. The run is deterministic under ``key`` and the batch
  order. The step is compiled once per ``(adapter, tx, loss)`` and reused across calls.

  Args:
    adapter: the :class:`~jaxmerge.tta.Adapter`.
    frozen: the fixed pytree (pretrained weights, task vectors, heads, ...), passed to every step.
    tx: the optax optimizer over ``theta``.
    batches: an iterable yielding at least ``steps`` batches (any pytree of arrays).
    loss: ``loss(out, batch) -> scalar`` (or ``(scalar, {name: scalar})`` with ``has_aux=True``), where
      ``out = adapter.apply(theta, frozen, batch, key=...)``.
    key: PRNG key (keyword-only).
    steps: number of optimizer steps (``0`` returns the initial ``theta``).
    progress: show a tqdm progress bar with the current loss.
    has_aux: ``loss`` also returns a dict of scalar metrics, recorded in the history.
    theta: start from this ``theta`` instead of ``adapter.init`` (it is copied, never donated).
    desc: progress-bar label.

  Returns:
    ``(theta, history)`` with ``history = {"loss": float32 [steps], <aux name>: float32 [steps], ...}``;
    entry ``i`` is the value at ``theta`` *before* update ``i``.

  Raises:
    ValueError: negative ``steps`` or ``batches`` exhausted before ``steps`` batches.
  """
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")
  init_key, loop_key = jax.random.split(key)
  if theta is None:
    theta = adapter.init(init_key, frozen)
  # The step donates theta: copy so that the caller's arrays (or arrays aliased by frozen) stay valid.
  theta = jax.tree.map(lambda x: jnp.array(x, copy=True), theta)
  opt_state = tx.init(theta)
  step = make_step(adapter, tx, loss, has_aux=has_aux)
  it = iter(batches)
  values, auxes = [], []
  bar = range(steps)
  if progress and steps:
    from tqdm.auto import tqdm

    bar = tqdm(bar, desc=desc, leave=False)
  for i in bar:
    try:
      batch = next(it)
    except StopIteration:
      raise ValueError(f"batches ran out after {i} of {steps} steps") from None
    theta, opt_state, value, aux = step(theta, opt_state, frozen, batch, jax.random.fold_in(loop_key, i))
    values.append(value)
    auxes.append(aux)
    if progress and steps and (i % 10 == 0 or i == steps - 1):
      bar.set_postfix(loss=f"{float(value):.4g}")  # one host sync every 10 steps
  history = {"loss": np.asarray(jax.device_get(jnp.stack(values)) if values else np.zeros(0), np.float32)}
  if auxes and auxes[0]:
    stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *auxes))
    history.update({k: np.asarray(v, np.float32) for k, v in stacked.items()})
  return theta, history
