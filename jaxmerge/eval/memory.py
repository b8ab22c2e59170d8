"""Peak resident memory of a stretch of code, for reports (``results.json`` of the CLIP suites).

::

    with PeakRSS() as m:
        merged = jax.block_until_ready(merge(...))
    m.peak_bytes, m.start_bytes          # the process's peak RSS during the block, its RSS at the start

On Linux the kernel's own high-water mark (``VmHWM``) is reset at the start (``/proc/self/clear_refs``), so the
peak is exact; where that is not possible a background thread samples ``VmRSS`` every 5 ms (a short spike between
samples can be missed) and ``method`` says which was used. The numbers are the whole process's: everything else
it holds (the experts, the compiled programs) is included, which is what a user's machine must have.
"""

from __future__ import annotations

import threading
import time

__all__ = ["PeakRSS", "rss_bytes"]


def _status(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def rss_bytes() -> int:
  """The process's resident memory now.

  Returns:
    Bytes: ``VmRSS``, or the peak ``ru_maxrss`` where ``/proc`` is missing.
  """
  now = _status("VmRSS")
  if now is not None:
    return now
  import resource  # noqa: PLC0415
  import sys  # noqa: PLC0415

  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(r if sys.platform == "darwin" else r * 1024)


class PeakRSS:
  """Context manager measuring the process's peak resident memory while it is open.

  Attributes:
    start_bytes: RSS on entry.
    peak_bytes: peak RSS between entry and exit (at least ``start_bytes``).
    method: ``"VmHWM"`` (kernel high-water mark, reset on entry) or ``"sampled"``.
  """

  def __init__(self, interval: float = 0.005):
    self.interval = interval
    self.start_bytes = self.peak_bytes = 0
    self.method = "sampled"
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> PeakRSS:
    self.start_bytes = self.peak_bytes = rss_bytes()
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      if _status("VmHWM") is not None:
        self.method = "VmHWM"
    except OSError:
      pass
    if self.method == "sampled":
      self._thread = threading.Thread(target=self._sample, daemon=True)
      self._thread.start()
    return self

  def _sample(self) -> None:
    while not self._stop.wait(self.interval):
      self.peak_bytes = max(self.peak_bytes, rss_bytes())

  def __exit__(self, *exc) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
    peak = _status("VmHWM") if self.method == "VmHWM" else None
    self.peak_bytes = max(self.peak_bytes, peak or 0, rss_bytes())

  def report(self, prefix: str = "") -> dict[str, float]:
    """``{prefix + "peak_rss_gb", prefix + "start_rss_gb"}`` in GB (10**9 bytes)."""
    return {f"{prefix}peak_rss_gb": self.peak_bytes / 1e9, f"{prefix}start_rss_gb": self.start_bytes / 1e9}
