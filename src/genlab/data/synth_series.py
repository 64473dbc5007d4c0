"""Synthetic time series for pretraining without downloads (issue 8).

KernelSynth (from Chronos): draw a few kernels from a bank of scikit-learn Gaussian-process
kernels (periodic at several periods, RBF, linear, rational-quadratic, white noise), combine
them at random with + and ×, and sample a series from the GP prior with that kernel.
TSMixup: convex combinations of mean-scaled windows of real series (here the ones that ship with
statsmodels), so the model also sees real-world shapes.
"""

from __future__ import annotations

import os

import numpy as np

from genlab.errors import InvalidParameterError


def kernel_bank(length: int) -> list:
    from sklearn.gaussian_process.kernels import RBF, DotProduct, ExpSineSquared, RationalQuadratic, WhiteKernel

    periods = [p for p in (4, 7, 12, 24, 30, 52, 60, 365) if p < length / 2]  # daily/weekly/monthly/yearly cycles
    bank = [ExpSineSquared(length_scale=1.0, periodicity=p / length) for p in periods]
    bank += [RBF(length_scale=s) for s in (0.05, 0.1, 0.5, 1.0)]
    bank += [RationalQuadratic(alpha=a, length_scale=s) for a, s in ((0.1, 0.1), (1.0, 0.5), (10.0, 1.0))]
    bank += [DotProduct(sigma_0=s) for s in (0.0, 1.0, 10.0)]  # linear trends
    bank += [WhiteKernel(noise_level=n) for n in (0.01, 0.1, 1.0)]
    return bank


CHUNK = 250  # series per independently seeded chunk: the result never depends on the worker count


def kernel_synth(n: int, length: int = 256, max_kernels: int = 5, seed: int = 0, workers: int | None = None) -> np.ndarray:
    """`n` series of `length` values [n, length], each a GP-prior sample under a random
    composition of up to `max_kernels` bank kernels. Chunks of CHUNK series are seeded by
    (seed, chunk) and drawn in `workers` processes (default: one per core, up to the chunks)."""
    if n < 1 or length < 8 or max_kernels < 1:
        raise InvalidParameterError("kernel_synth needs n >= 1, length >= 8 and max_kernels >= 1")
    jobs = [(min(CHUNK, n - start), length, max_kernels, (seed, start // CHUNK)) for start in range(0, n, CHUNK)]
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers == 1:
        return np.concatenate([_kernel_synth_chunk(*job) for job in jobs])
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        return np.concatenate(list(pool.map(_kernel_synth_chunk, *zip(*jobs))))


def _one_thread() -> None:
    """Worker processes run one BLAS thread each (many workers x many threads thrash the cores)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _kernel_synth_chunk(n: int, length: int, max_kernels: int, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bank = kernel_bank(length)
    t = np.linspace(0, 1, length)[:, None]
    out = np.empty((n, length))
    for i in range(n):
        chosen = [bank[j] for j in rng.choice(len(bank), size=rng.integers(1, max_kernels + 1), replace=True)]
        kernel = chosen[0]
        for k in chosen[1:]:
            kernel = kernel + k if rng.random() < 0.5 else kernel * k
        cov = kernel(t) + 1e-6 * np.eye(length)  # jitter keeps the Cholesky factorisation stable
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            w, v = np.linalg.eigh(cov)
            chol = v * np.sqrt(np.clip(w, 0, None))
        out[i] = chol @ rng.standard_normal(length)
    return out


def bundled_series() -> dict[str, np.ndarray]:
    """Real series that ship with statsmodels (no download): climate, ocean, solar, economy."""
    import statsmodels.api as sm

    co2 = sm.datasets.co2.load_pandas().data["co2"]
    elnino = sm.datasets.elnino.load_pandas().data.drop(columns="YEAR").to_numpy().ravel()
    sunspots = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"]
    macro = sm.datasets.macrodata.load_pandas().data
    return {"co2": co2.interpolate().to_numpy(), "elnino": elnino, "sunspots": sunspots.to_numpy(),
            "realgdp": macro["realgdp"].to_numpy(), "cpi": macro["cpi"].to_numpy(),
            "unemp": macro["unemp"].to_numpy()}


def ts_mixup(series: list[np.ndarray], n: int, length: int = 256, max_parts: int = 3, seed: int = 0) -> np.ndarray:
    """`n` convex combinations [n, length] of up to `max_parts` random windows of `series`, each
    scaled by its mean absolute value first (so no series dominates by its units)."""
    usable = [np.asarray(s, dtype=float) for s in series if len(s) >= length and np.isfinite(s).all()]
    if not usable:
        raise InvalidParameterError(f"ts_mixup needs finite series of at least {length} values")
    rng = np.random.default_rng(seed)
    out = np.empty((n, length))
    for i in range(n):
        k = rng.integers(1, max_parts + 1)
        weights = rng.dirichlet(np.ones(k))
        mix = np.zeros(length)
        for w in weights:
            s = usable[rng.integers(len(usable))]
            start = rng.integers(0, len(s) - length + 1)
            window = s[start:start + length]
            mix += w * window / max(np.abs(window).mean(), 1e-8)
        out[i] = mix
    return out
