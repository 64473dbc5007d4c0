"""The series codec: mean-absolute scaling and uniform quantisation, round trips within half a bin."""

from __future__ import annotations

import numpy as np
import pytest

from genlab.codecs.series import EOS, MISSING, PAD, SPECIAL, SeriesCodec
from genlab.errors import DataError, InvalidParameterError


def bundled_co2() -> np.ndarray:
    import statsmodels.api as sm

    return sm.datasets.co2.load_pandas().data["co2"].to_numpy()


@pytest.mark.parametrize("bins", [4096, 256])
def test_round_trip_within_half_a_bin(bins):
    codec = SeriesCodec(bins=bins)
    rng = np.random.default_rng(0)
    for x in (rng.normal(50, 10, 500), np.sin(np.linspace(0, 20, 300)) * 3 - 1, rng.lognormal(0, 1, 200)):
        ids, scale = codec.encode(x)
        assert ids.min() >= SPECIAL and ids.max() < codec.vocab_size
        back = codec.decode(ids, scale)
        assert np.max(np.abs(back - x)) <= codec.width / 2 * scale + 1e-9
    assert codec.vocab_size == bins + 3


def test_real_series_with_missing_values():
    codec = SeriesCodec()
    x = bundled_co2()  # weekly Mauna Loa CO2, with gaps (NaN)
    assert np.isnan(x).any()
    ids, scale = codec.encode(x)
    assert scale == pytest.approx(np.nanmean(np.abs(x)))
    assert (ids == MISSING).sum() == np.isnan(x).sum()
    back = codec.decode(ids, scale)
    assert np.array_equal(np.isnan(back), np.isnan(x))
    assert np.nanmax(np.abs(back - x)) <= codec.width / 2 * scale + 1e-9


def test_continuation_uses_the_context_scale_and_clips_outside_the_range():
    codec = SeriesCodec(bins=100, low=-2, high=2)
    context = np.array([1.0, -1.0, 1.0, -1.0])
    _, scale = codec.encode(context)
    ids, same = codec.encode([0.5, 100.0, -100.0], scale=scale)
    assert same == scale == 1.0
    assert codec.decode(ids, scale)[1] == pytest.approx(2 - codec.width / 2)  # clipped to the top bin
    assert codec.decode(ids, scale)[2] == pytest.approx(-2 + codec.width / 2)


def test_special_tokens_and_constant_series():
    codec = SeriesCodec(bins=64)
    ids, scale = codec.encode(np.zeros(5))
    assert scale == 1.0 and np.all(np.abs(codec.decode(ids, scale)) <= codec.width / 2)
    ids, scale = codec.encode([3.0, 3.0, 3.0])
    assert scale == 3.0 and np.allclose(codec.decode(ids, scale), 3.0, atol=codec.width / 2 * 3)
    values = codec.decode([SPECIAL + 10, PAD, MISSING, EOS, SPECIAL + 5], 2.0)
    assert len(values) == 3 and np.isnan(values[1:]).all()  # EOS ends the series
    assert SeriesCodec.from_dict(codec.to_dict()) == codec


@pytest.mark.parametrize("values, message", [
    ([np.nan, np.nan], "no observed values"),
    (["1.0", "abc"], "must hold numbers"),
    ([[1.0, 2.0], [3.0, 4.0]], "one-dimensional"),
])
def test_bad_series(values, message):
    with pytest.raises(DataError, match=message):
        SeriesCodec().encode(values)


def test_bad_codec_and_ids():
    with pytest.raises(InvalidParameterError):
        SeriesCodec(bins=1)
    with pytest.raises(InvalidParameterError):
        SeriesCodec(low=1, high=0)
    with pytest.raises(InvalidParameterError, match="token ids"):
        SeriesCodec(bins=8).decode([100], 1.0)
    with pytest.raises(InvalidParameterError, match="scale"):
        SeriesCodec().encode([1.0], scale=0)


def test_kernel_synth_and_ts_mixup_are_seeded_and_shaped():
    from genlab.data.synth_series import bundled_series, kernel_synth, ts_mixup

    a, b = kernel_synth(6, length=128, seed=1), kernel_synth(6, length=128, seed=1)
    assert a.shape == (6, 128) and np.isfinite(a).all() and np.array_equal(a, b)
    assert not np.array_equal(a, kernel_synth(6, length=128, seed=2))
    many = kernel_synth(520, length=16, seed=1, workers=1)  # three seeded chunks
    assert np.array_equal(many, kernel_synth(520, length=16, seed=1, workers=2))  # whatever the worker count
    assert np.std(a, axis=1).min() > 0  # every sample varies
    real = bundled_series()
    assert {"co2", "elnino", "sunspots", "realgdp"} <= set(real) and all(np.isfinite(s).all() for s in real.values())
    mixed = ts_mixup(list(real.values()), 5, length=100, seed=0)
    assert mixed.shape == (5, 100) and np.isfinite(mixed).all()
    assert np.allclose(np.abs(mixed).mean(axis=1), 1.0, atol=0.6)  # scaled parts, convex weights
    codec = SeriesCodec()
    for x in [*a, *mixed]:  # everything the generators make fits the codec's range after scaling
        ids, scale = codec.encode(x)
        assert np.max(np.abs(codec.decode(ids, scale) - x)) <= codec.width / 2 * scale + 1e-9


def test_periodic_kernel_gives_a_periodic_series():
    from sklearn.gaussian_process.kernels import ExpSineSquared

    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 240)[:, None]
    cov = ExpSineSquared(length_scale=1.0, periodicity=24 / 240)(t) + 1e-6 * np.eye(240)
    x = np.linalg.cholesky(cov) @ rng.standard_normal(240)
    assert np.corrcoef(x[:-24], x[24:])[0, 1] > 0.95  # what kernel_synth composes from
