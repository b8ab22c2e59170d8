"""What the subspace methods' factorizations cost and how exact they can be, on full-size CLIP ViT-B/32 matrices.

Two measurements that back the status in ``benchmarks/results/subspace.md``:

- ``--kernels``: CPU seconds of one factorization of a ``768 x 768`` and a ``3072 x 768`` float32 matrix with
  each library (XLA's ``jnp.linalg.svd``, ``torch.linalg.svd``, SciPy ``gesdd``/``gesvd``, singular values
  only, and the Gram route: ``x^T x`` then a symmetric eigensolver, in float32 and float64). Run it pinned to
  one core with one thread per library (``taskset -c 1`` and the environment below) so that the numbers are the
  work of each routine, not the share of a loaded machine it got.
- ``--accuracy``: TSV-M on one block's ``q_proj``, ``fc1`` and ``fc2`` (the benchmark inputs) computed in
  float64 (the exact result of the float32 inputs) against fusion-bench in float32, jaxmerge (``auto``) and two
  cheaper routes (float32 Gram/eigh for the per-task top-``k``; Gram polar factors), as relative Frobenius
  errors; plus the relative gap of the singular values at the cut ``k`` and the condition number of ``U^``.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
      XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
      taskset -c 1 python benchmarks/bench_subspace_kernels.py --kernels
    python benchmarks/bench_subspace_kernels.py --accuracy --tasks 4
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def _cpu(fn, reps: int = 3) -> float:
  """Smallest process CPU time of ``reps`` calls of ``fn`` after one warm-up call."""
  fn()
  best = float("inf")
  for _ in range(reps):
    c0 = time.process_time()
    fn()
    best = min(best, time.process_time() - c0)
  return best


def kernels() -> None:
  """Prints a markdown table: CPU seconds per factorization, per library and shape."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import scipy.linalg as sl  # noqa: PLC0415
  import torch  # noqa: PLC0415

  hi = jax.lax.Precision.HIGHEST
  svd = jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False))
  svals = jax.jit(lambda a: jnp.linalg.svd(a, compute_uv=False))
  eigh = jax.jit(lambda a: jnp.linalg.eigh(jnp.matmul(a.T, a, precision=hi)))
  with jax.enable_x64(True):
    eigh64 = jax.jit(lambda a: jnp.linalg.eigh(jnp.matmul(a.T.astype(jnp.float64), a.astype(jnp.float64))))
  rows = {}
  rng = np.random.default_rng(0)
  for shape in [(768, 768), (3072, 768)]:
    x = rng.standard_normal(shape).astype(np.float32)
    xj, xt = jnp.asarray(x), torch.from_numpy(x)
    r = {
        "jnp.linalg.svd (XLA -> LAPACK gesdd)": _cpu(lambda: jax.block_until_ready(svd(xj))),
        "torch.linalg.svd (MKL gesdd)": _cpu(lambda: torch.linalg.svd(xt, full_matrices=False)),
        "scipy gesdd": _cpu(lambda: sl.svd(x, full_matrices=False, lapack_driver="gesdd", check_finite=False)),
        "scipy gesvd": _cpu(lambda: sl.svd(x, full_matrices=False, lapack_driver="gesvd", check_finite=False)),
        "jnp singular values only": _cpu(lambda: jax.block_until_ready(svals(xj))),
        "jnp Gram + eigh, float32": _cpu(lambda: jax.block_until_ready(eigh(xj))),
        "torch Gram + eigh, float32": _cpu(lambda: torch.linalg.eigh(xt.T @ xt)),
        "torch Gram + eigh, float64": _cpu(lambda: torch.linalg.eigh(xt.double().T @ xt.double())),
    }
    with jax.enable_x64(True):
      r["jnp Gram + eigh, float64"] = _cpu(lambda: jax.block_until_ready(eigh64(xj)))
    for k, v in r.items():
      rows.setdefault(k, []).append(v)
  print("| routine | 768x768 (CPU s) | 3072x768 (CPU s) |\n|---|---|---|")
  for k, (a, b) in rows.items():
    print(f"| {k} | {a:.3f} | {b:.3f} |")


def accuracy(tasks: int) -> None:
  """Prints TSV-M's relative errors against the float64 result for three matrices of block 0."""
  import torch  # noqa: PLC0415

  import jaxmerge as jm  # noqa: PLC0415
  from bench_subspace import inputs  # noqa: PLC0415

  tvs = inputs(tasks, 1)
  keys = [k for k in tvs[0] if tvs[0][k].ndim == 2]

  def svd64(x, k):
    u, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    return u[:, :k], s[:k], vt[:k]

  def svd32(x, k):
    u, s, vt = torch.linalg.svd(torch.from_numpy(x), full_matrices=False)
    return u[:, :k].numpy(), s[:k].numpy(), vt[:k].numpy()

  def gram32(x, k):
    tall = x.shape[0] >= x.shape[1]
    y = x if tall else x.T
    w, v = np.linalg.eigh(y.T @ y)
    v = v[:, ::-1][:, :k]
    s = np.sqrt(np.maximum(w[::-1][:k], 0))
    u = (y @ v) / s
    return (u, s, v.T) if tall else (v, s, u.T)

  def pol64(a):
    u, _, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    return u @ vt

  def pol32(a):
    u, _, vt = torch.linalg.svd(torch.from_numpy(np.asarray(a, np.float32)), full_matrices=False)
    return (u @ vt).numpy()

  def polgram32(a):
    a = np.asarray(a, np.float32)
    w, v = np.linalg.eigh(a.T @ a)
    with np.errstate(all="ignore"):
      return a @ ((v / np.sqrt(w)) @ v.T)

  def tsvm(xs, svd, polar):
    k = int(min(xs[0].shape) * (1 / len(xs)))
    fs = [svd(x, k) for x in xs]
    u = np.concatenate([f[0] for f in fs], 1)
    s = np.concatenate([f[1] for f in fs])
    v = np.concatenate([f[2].T for f in fs], 1)
    return (polar(u) * s) @ polar(v).T

  def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

  tx = jm.get_method("tsv_m")(scale=1.0)
  print("| matrix | sigma_1 / sigma_k | rel. gap at k | cond(U^) | fusion-bench f32 | jaxmerge auto | "
        "jaxmerge vs fusion-bench | f32 Gram top-k | Gram polar f32 |\n|---|---|---|---|---|---|---|---|---|")
  for key in (keys[0], keys[4], keys[5]):
    xs = [tv[key] for tv in tvs]
    ref = tsvm(xs, svd64, pol64)
    fb = tsvm(xs, svd32, pol32)
    out = np.asarray(jm.merge(tx, {key: np.zeros_like(xs[0])}, [{key: x} for x in xs])[key])
    k = int(min(xs[0].shape) / tasks)
    s = np.linalg.svd(xs[0].astype(np.float64), compute_uv=False)
    cu = np.linalg.svd(np.concatenate([svd64(x, k)[0] for x in xs], 1), compute_uv=False)
    gp = tsvm(xs, svd32, polgram32)
    gp_err = rel(gp, ref) if np.all(np.isfinite(gp)) else float("nan")
    print(f"| {key.split('layers.0.')[1]} {xs[0].shape} | {s[0] / s[k - 1]:.1f} | {(s[k - 1] - s[k]) / s[k - 1]:.1e} | "
          f"{cu[0] / cu[-1]:.1e} | {rel(fb, ref):.1e} | {rel(out, ref):.1e} | {rel(out, fb):.1e} | "
          f"{rel(tsvm(xs, gram32, pol64), ref):.1e} | {gp_err:.1e} |", flush=True)


def main() -> None:
  """Command line: ``--kernels`` and/or ``--accuracy [--tasks T]``."""
  ap = argparse.ArgumentParser()
  ap.add_argument("--kernels", action="store_true")
  ap.add_argument("--accuracy", action="store_true")
  ap.add_argument("--tasks", type=int, default=4)
  a = ap.parse_args()
  if a.kernels:
    kernels()
  if a.accuracy:
    accuracy(a.tasks)


if __name__ == "__main__":
  main()
