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
