"""Series models: pretraining into a model folder, sampled forecasts, generation, fine-tuning,
the `genlab series` commands and their bad-input messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from genlab.codecs.series import SeriesCodec
from genlab.errors import DataError, InvalidParameterError

TINY = dict(preset="1m", bins=256, seq_len=64, prediction_length=16, synthetic=300, mixup=100, max_steps=40,
            batch_size=16, eval_every=20, log_every=10, checkpoint_every=40, warmup_steps=5)


def genlab(*args):
    return subprocess.run([sys.executable, "-m", "genlab.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.fixture(scope="module")
def series_model(tmp_path_factory):
    from genlab.series.train import pretrain_series

    run = pretrain_series(out=str(tmp_path_factory.mktemp("series") / "run"), **TINY)
    assert run.result.val_loss < run.val_loss_before - 1.0  # it learned something about series
    return run


def seasonal(n: int, period: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 50 + 10 * np.sin(2 * np.pi * t / period) + rng.normal(0, 0.3, n)


def test_pretrained_folder_holds_the_series_codec(series_model):
    from genlab.model import io

    loaded = io.load(series_model.output_dir)
    assert isinstance(loaded.tokenizer, SeriesCodec) and loaded.tokenizer.bins == 256
    assert loaded.module.config.vocab_size == loaded.tokenizer.vocab_size == 259
    assert loaded.meta["series"] == {"context_length": 48, "prediction_length": 16, "center": False}
    hf = json.loads((series_model.output_dir / "config.json").read_text())
    assert hf["vocab_size"] == 259 and hf["architectures"] == ["LlamaForCausalLM"]  # a plain HF folder
    assert (series_model.out / "loss.png").exists() and (series_model.out / "metrics.jsonl").exists()


def test_sampled_paths_quantiles_and_seeds(series_model):
    from genlab.series.model import SeriesModel, summarise

    model = SeriesModel.load(series_model.output_dir, num_samples=40, seed=3)
    context = seasonal(100)
    paths = model.sample(context, 10)
    assert paths.shape == (40, 10) and np.isfinite(paths).all()
    assert np.array_equal(paths, model.sample(context, 10))  # same seed, same paths
    assert not np.array_equal(paths, model.sample(context, 10, seed=4))
    fc = summarise(paths)
    assert (np.diff(fc.quantiles, axis=0) >= 0).all() and fc.quantiles.shape == (9, 10)
    # every value is a bin centre at the context's scale, inside the codec's range
    recent = context[-model.context_length:]
    assert not model.center and np.abs(paths).max() <= 15 * SeriesCodec.scale_of(recent)
    centred = SeriesModel(model.module, model.codec, model.context_length, center=True, num_samples=40)
    around = centred.sample(context, 10)  # (the tiny model was trained uncentred: only the arithmetic is checked)
    assert np.abs(around - recent.mean()).max() <= 15 * SeriesCodec.scale_of(recent - recent.mean())
    # missing values in the context are model inputs, not errors
    gappy = context.copy()
    gappy[60:70] = np.nan
    assert np.isfinite(model.sample(gappy, 5)).all()
    with pytest.raises(DataError, match="no observed values"):
        model.sample(np.full(20, np.nan), 5)


def test_generation_slides_past_the_model_window(series_model):
    from genlab.series.model import SeriesModel

    model = SeriesModel.load(series_model.output_dir, num_samples=3, seed=0)
    window = model.config.max_seq_len
    paths = model.sample(seasonal(80), window + 40)  # longer than the whole window
    assert paths.shape == (3, window + 40) and np.isfinite(paths).all()


def test_finetuning_on_a_series_beats_the_base_model_on_it(series_model, tmp_path):
    """A distinctive series (period-7 zigzag): LoRA fine-tuning on its history lowers the error
    of forecasts made after that history, and the adapter folder loads on its own."""
    from genlab.series.backtest import mase
    from genlab.series.model import SeriesModel
    from genlab.series.train import finetune_series

    rng = np.random.default_rng(1)
    pattern = np.array([0, 9, 2, 7, 1, 8, 3.0])
    values = 20 + np.tile(pattern, 60) + rng.normal(0, 0.2, 420)
    history, future = values[:400], values[400:]
    run = finetune_series(model=str(series_model.output_dir), out=str(tmp_path / "ft"), series={"zigzag": history},
                          max_steps=60, lr=3e-3, eval_every=30, log_every=10, synthetic=0, mixup=0)
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").exists()
    assert run.result.val_loss < run.val_loss_before
    base = SeriesModel.load(series_model.output_dir, num_samples=30, seed=0)
    tuned = SeriesModel.load(run.output_dir, num_samples=30, seed=0)  # an adapter folder: base found from it
    assert tuned.name == "genlab-finetuned"
    errors = [mase(future, m([history], 20)[0].median, history, 7) for m in (base, tuned)]
    assert errors[1] < 0.7 * errors[0], errors
    # replay (the default): pretraining-style windows are mixed in, one per generated series
    replayed = finetune_series(model=str(series_model.output_dir), out=str(tmp_path / "ft2"),
                               series={"zigzag": history}, max_steps=2, synthetic=40, mixup=20)
    assert replayed.data["windows"] == run.data["windows"] + 60
    full = finetune_series(model=str(series_model.output_dir), out=str(tmp_path / "full"), series={"zigzag": history},
                           max_steps=2, full=True, synthetic=0, mixup=0)
    assert full.output_dir.name == "model" and SeriesModel.load(full.output_dir).sample(history, 3).shape == (100, 3)


def test_a_text_model_is_not_a_series_model(tmp_path, tokenizer):
    import genlab
    from genlab.series.model import SeriesModel
    from tests.servers import TINY as TEXT_TINY

    genlab.build(TEXT_TINY, tokenizer).save(tmp_path / "text")
    with pytest.raises(InvalidParameterError, match="not a series model"):
        SeriesModel.load(tmp_path / "text")


def test_cli_forecast_generate_and_bad_input(series_model, tmp_path):
    dates = pd.date_range("2000-01-01", periods=120, freq="MS")
    csv = tmp_path / "sensor.csv"
    pd.DataFrame({"date": dates, "temp": seasonal(120), "flow": seasonal(120, 6, 1)}).to_csv(csv, index=False)
    model = series_model.output_dir

    r = genlab("series", "forecast", model, "--data", csv, "--column", "temp", "--horizon", "12", "--samples", "20",
               "--out", tmp_path / "fc.csv")
    assert r.returncode == 0, r.stderr
    fc = pd.read_csv(tmp_path / "fc.csv", parse_dates=["timestamp"])
    assert list(fc.columns) == ["timestamp", "mean", "median"] + [f"q{q / 10:.1f}" for q in range(1, 10)]
    assert len(fc) == 12 and fc["timestamp"].iloc[0] == pd.Timestamp("2010-01-01")  # the month after the data
    assert (fc["q0.9"] >= fc["q0.1"]).all() and (tmp_path / "fc.png").stat().st_size > 5000

    r = genlab("series", "generate", model, "--data", csv, "--column", "flow", "--length", "30", "-n", "4",
               "--out", tmp_path / "gen.csv")
    assert r.returncode == 0, r.stderr
    gen = pd.read_csv(tmp_path / "gen.csv")
    assert gen.shape == (30, 5) and gen.drop(columns="timestamp").notna().all().all()

    r = genlab("series", "forecast", model, "--data", csv, "--horizon", "12")  # two value columns: which?
    assert r.returncode == 2 and "--column" in r.stderr and "temp" in r.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("date,temp\n2000-01-01,1.5\n2000-02-01,warm\n2000-03-01,2.5\n")
    r = genlab("series", "forecast", model, "--data", bad, "--horizon", "3")
    assert r.returncode == 2 and "line 3" in r.stderr and "temp" in r.stderr
    r = genlab("series", "forecast", tmp_path / "nowhere", "--data", csv, "--column", "temp", "--horizon", "3")
    assert r.returncode == 2 and "nowhere" in r.stderr


def test_cli_eval_on_user_series_and_short_or_constant_input(series_model, tmp_path):
    dates = pd.date_range("2000-01-01", periods=150, freq="MS")
    csv = tmp_path / "plant.csv"
    pd.DataFrame({"month": dates, "load": seasonal(150), "flat": 5.0}).to_csv(csv, index=False)
    out = tmp_path / "eval"
    r = genlab("series", "eval", series_model.output_dir, "--series", "none", "--data", csv, "--column", "load",
               "--windows", "2", "--samples", "20", "--no-finetune", "--no-arima", "--out", out)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "backtest.json").read_text())
    models = {row["model"] for row in report["rows"]}
    assert models == {"seasonal-naive", "ets", "genlab-zero-shot"}
    assert all(row["windows"] == 2 and row["series"] == "plant:load" for row in report["rows"])
    # a monthly series with a clean period-12 cycle: seasonal naive is hard to beat, and the scores are real numbers
    assert all(np.isfinite(row["mase"]) and np.isfinite(row["wql"]) for row in report["rows"])
    assert (out / "relative.png").exists() and (out / "backtest.csv").exists()

    r = genlab("series", "forecast", series_model.output_dir, "--data", csv, "--column", "flat", "--horizon", "6",
               "--samples", "20", "--out", tmp_path / "flat.csv")
    assert r.returncode == 0, r.stderr
    assert "constant" in r.stderr  # noted, and still forecast
    flat = pd.read_csv(tmp_path / "flat.csv")
    assert flat["median"].between(4, 6).all()

    short = tmp_path / "short.csv"
    pd.DataFrame({"month": dates[:30], "load": seasonal(30)}).to_csv(short, index=False)
    r = genlab("series", "eval", series_model.output_dir, "--series", "none", "--data", short, "--no-finetune",
               "--out", tmp_path / "eval2")
    assert r.returncode == 2 and "30 values" in r.stderr and "load" in r.stderr
