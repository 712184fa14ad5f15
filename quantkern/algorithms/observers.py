"""Activation observers for static quantization: each sees calibration rows ``x2d [T, K]`` through
:meth:`update` and, once frozen, returns the range ``(lo, hi)`` (fp32 scalars, ``lo <= 0 <= hi``)
that static scales are derived from. Symmetric formats use ``amax = max(-lo, hi)``.

- ``minmax``: the extremes over all rows seen.
- ``moving_average``: per-batch min / max, averaged with ``x̄ <- x̄ + c·(x_batch − x̄)``
  (``averaging_constant`` ``c``; the first batch initialises), as torch.ao's observer of that name.
- ``percentile``: per batch the ``percentile``-th percentile of ``|x|`` (on at most ``max_samples``
  values, fixed seed), averaged over batches; gives ``(-p, p)``. Ignores rare outliers.
- ``mse``: keeps a fixed-seed reservoir of values and the running abs-max, then picks the clipping
  ``r·amax`` (``r`` on a geometric grid in [1e-3, 1]) minimising the mean squared error of fake-quantizing the
  reservoir with ``bits``-bit symmetric integer levels (or fp8 E4M3 values with ``fp8=True``).

:class:`AbsMaxObserver` (not one of :data:`OBSERVERS`) keeps a per-channel running ``max|x|`` instead: the
statistic SmoothQuant's smoothing factors are computed from.
"""

from __future__ import annotations

import torch

OBSERVERS = ("minmax", "moving_average", "percentile", "mse")


class Observer:
    def __init__(self):
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if x2.shape[0] == 0:
            return
        if not torch.isfinite(x2).all():
            raise ValueError("observer: activations contain inf/NaN")
        self._update(x2)
        self.count += x2.shape[0]

    def _update(self, x2: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        """``(lo, hi)`` with ``lo <= 0 <= hi``; ``RuntimeError`` if nothing was observed."""
        if self.count == 0:
            raise RuntimeError(f"{type(self).__name__} saw no calibration data")
        lo, hi = self._range()
        return min(float(lo), 0.0), max(float(hi), 0.0)

    def _range(self):
        raise NotImplementedError

    @property
    def amax(self) -> torch.Tensor | None:
        """Symmetric abs-max as a 1-element tensor (None before any data)."""
        if self.count == 0:
            return None
        lo, hi = self.range()
        return torch.tensor([max(-lo, hi)])


class MinMaxObserver(Observer):
    def __init__(self):
        super().__init__()
        self.lo, self.hi = float("inf"), float("-inf")

    def _update(self, x2):
        self.lo, self.hi = min(self.lo, float(x2.min())), max(self.hi, float(x2.max()))

    def _range(self):
        return self.lo, self.hi


class MovingAverageObserver(Observer):
    def __init__(self, averaging_constant: float = 0.01):
        super().__init__()
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.c = averaging_constant
        self.lo = self.hi = None

    def _update(self, x2):
        lo, hi = float(x2.min()), float(x2.max())
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo += self.c * (lo - self.lo)
            self.hi += self.c * (hi - self.hi)

    def _range(self):
        return self.lo, self.hi


def _sample(values: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    if values.numel() <= n:
        return values
    return values[torch.randint(0, values.numel(), (n,), generator=gen, device="cpu").to(values.device)]


class PercentileObserver(Observer):
    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 20):
        super().__init__()
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.q, self.max_samples = percentile / 100, max_samples
        self.gen = torch.Generator().manual_seed(0)
        self.values: list[float] = []

    def _update(self, x2):
        v = _sample(x2.abs().flatten(), self.max_samples, self.gen)
        self.values.append(float(torch.quantile(v, self.q)))

    def _range(self):
        p = sum(self.values) / len(self.values)
        return -p, p


class MSEObserver(Observer):
    def __init__(self, bits: int = 8, reservoir: int = 1 << 16, grid: int = 60, min_ratio: float = 1e-3,
                 fp8: bool = False):
        super().__init__()
        self.fp8 = fp8
        self.qmax = 448.0 if fp8 else (1 << (bits - 1)) - 1
        self.reservoir, self.grid, self.min_ratio = reservoir, grid, min_ratio
        self.gen = torch.Generator().manual_seed(0)
        self.kept: list[torch.Tensor] = []
        self.abs_max = 0.0

    def _update(self, x2):
        self.abs_max = max(self.abs_max, float(x2.abs().max()))
        self.kept.append(_sample(x2.flatten(), self.reservoir, self.gen).cpu())
        if sum(t.numel() for t in self.kept) > 4 * self.reservoir:  # bound memory
            self.kept = [_sample(torch.cat(self.kept), self.reservoir, self.gen)]

    def _range(self):
        v = torch.cat(self.kept)
        best, best_err = self.abs_max, float("inf")
        if self.abs_max == 0:
            return 0.0, 0.0
        for i in range(self.grid + 1):
            amax = self.abs_max * self.min_ratio ** (i / self.grid)  # geometric: outliers can be huge
            s = amax / self.qmax
            q = (v / s).clamp(-self.qmax, self.qmax)
            q = q.to(torch.float8_e4m3fn).float() if self.fp8 else q.round()
            err = float((q * s - v).pow(2).mean())
            if err < best_err:
                best, best_err = amax, err
        return -best, best


def make_observer(kind: str, **kwargs) -> Observer:
    """``kind`` in :data:`OBSERVERS`; ``kwargs`` go to that observer (``ValueError`` if unknown)."""
    classes = {"minmax": MinMaxObserver, "moving_average": MovingAverageObserver, "percentile": PercentileObserver,
               "mse": MSEObserver}
    if kind not in classes:
        raise ValueError(f"observer must be one of {list(OBSERVERS)}, got {kind!r}")
    return classes[kind](**kwargs)


class AbsMaxObserver:
    """Running per-channel ``max|x|`` over the rows fed to :meth:`update` (any leading dims)."""

    def __init__(self):
        self.amax: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            return
        m = x2.abs().amax(dim=0).float()
        self.amax = m if self.amax is None else torch.maximum(self.amax, m.to(self.amax.device))
        self.count += x2.shape[0]
