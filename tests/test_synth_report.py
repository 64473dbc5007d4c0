"""Synthetic-data report: fidelity, utility and privacy metrics and the two baseline generators."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from genlab.errors import DataError, InvalidParameterError
from genlab.synth.baselines import GaussianCopula, IndependentMarginals, infer_kinds
from genlab.synth.report import fidelity, privacy, report, utility


@pytest.fixture(autouse=True)
def one_thread():
    """OpenMP on a shared 2-core machine can stall for seconds; these tables are small anyway."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def wine():
    from sklearn.datasets import load_wine

    df = load_wine(as_frame=True).frame
    df["target"] = df["target"].map({0: "class_0", 1: "class_1", 2: "class_2"})
    return df


@pytest.fixture(scope="module")
def cancer_thirds():
    """Breast cancer split into train / holdout / a third drawn from the same distribution ("fresh synthetic")."""
    from sklearn.datasets import load_breast_cancer

    df = load_breast_cancer(as_frame=True).frame
    df["target"] = df["target"].map({0: "malignant", 1: "benign"})
    df = df.sample(frac=1, random_state=0).reset_index(drop=True)
    return [part.reset_index(drop=True) for part in (df[:190], df[190:380], df[380:570])]


def mixed_table(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    df = pd.DataFrame({
        "x": x,
        "y": 2 * x + rng.normal(scale=0.5, size=n),
        "count": rng.poisson(3, n),
        "flag": x > 0.5,
        "colour": pd.Categorical(np.where(x > 0, "red", rng.choice(["green", "blue"], n))),
        "city": rng.choice(["paris", "rome", None], n, p=[0.5, 0.4, 0.1]),
        "when": pd.Timestamp("2024-01-01") + pd.to_timedelta(np.round(10 * x + 50), unit="D"),
    })
    df.loc[rng.random(n) < 0.1, "y"] = np.nan
    return df


# -------------------------------------------------------------------------------------------- baselines
def test_kinds_are_inferred_and_overridable():
    df = mixed_table(20)
    assert infer_kinds(df) == {"x": "numeric", "y": "numeric", "count": "integer", "flag": "boolean",
                               "colour": "categorical", "city": "categorical", "when": "datetime"}
    assert infer_kinds(df, {"count": "categorical", "absent": "numeric"})["count"] == "categorical"
    with pytest.raises(InvalidParameterError, match="kinds"):
        infer_kinds(df, {"x": "float"})


@pytest.mark.parametrize("generator", [IndependentMarginals, GaussianCopula])
def test_baselines_keep_types_marginals_and_missing_rates(generator):
    real = mixed_table(600)
    synth = generator().fit(real).sample(3000, seed=1)
    assert list(synth.columns) == list(real.columns) and len(synth) == 3000
    assert synth["x"].dtype == np.float64 and synth["count"].dtype == real["count"].dtype
    assert synth["flag"].dtype == bool and isinstance(synth["colour"].dtype, pd.CategoricalDtype)
    assert pd.api.types.is_datetime64_any_dtype(synth["when"])
    assert set(synth["city"].dropna()) == {"paris", "rome"}
    assert abs(synth["y"].isna().mean() - real["y"].isna().mean()) < 0.03
    assert abs(synth["city"].isna().mean() - real["city"].isna().mean()) < 0.03
    assert abs(synth["x"].mean() - real["x"].mean()) < 0.1 and abs(synth["x"].std() / real["x"].std() - 1) < 0.1
    assert synth["x"].between(real["x"].min(), real["x"].max()).all()
    # interpolated quantiles: continuous values fall between real ones instead of copying them
    assert synth["x"].isin(real["x"]).mean() < 0.01
    assert abs(synth["flag"].mean() - real["flag"].mean()) < 0.04
    again = generator().fit(real).sample(3000, seed=1)
    pd.testing.assert_frame_equal(synth, again)
    assert not synth["x"].equals(generator().fit(real).sample(3000, seed=2)["x"])


def test_copula_keeps_correlation_that_marginals_lose():
    rng = np.random.default_rng(0)
    z = rng.multivariate_normal([0, 0], [[1, 0.8], [0.8, 1]], size=2000)
    real = pd.DataFrame({"a": z[:, 0], "b": np.exp(z[:, 1]), "c": np.where(z[:, 1] > 0, "hi", "lo")})
    cop = GaussianCopula().fit(real).sample(4000, seed=0)
    ind = IndependentMarginals().fit(real).sample(4000, seed=0)
    rho = lambda df: df["a"].corr(df["b"], method="spearman")  # noqa: E731
    assert abs(rho(cop) - rho(real)) < 0.05
    assert abs(rho(ind)) < 0.05
    assert cop.groupby("c")["a"].mean()["hi"] > cop.groupby("c")["a"].mean()["lo"] + 0.8
    assert abs(ind.groupby("c")["a"].mean()["hi"] - ind.groupby("c")["a"].mean()["lo"]) < 0.1


def test_baseline_errors():
    with pytest.raises(InvalidParameterError, match="fit"):
        GaussianCopula().sample(5)
    with pytest.raises(DataError, match="empty"):
        IndependentMarginals().fit(pd.DataFrame({"a": []}))
    with pytest.raises(InvalidParameterError, match="non-negative"):
        IndependentMarginals().fit(mixed_table(10)).sample(-1)
    with pytest.raises(DataError, match="'name'.*numeric"):
        GaussianCopula().fit(pd.DataFrame({"name": ["ann", "bob"]}), kinds={"name": "numeric"})


# --------------------------------------------------------------------------------------------- fidelity
def test_identical_data_scores_one(wine):
    f = fidelity(wine, wine.copy())
    assert f["shape"] == 1.0 and f["pair_trends"] == 1.0 and f["overall"] == 1.0
    assert all(c["score"] == 1.0 for c in f["columns"].values())
    assert f["columns"]["target"]["metric"] == "TVD" and f["columns"]["alcohol"]["metric"] == "KS"
    assert f["n_pairs_total"] == f["n_pairs_scored"] == 14 * 13 // 2


def test_shuffled_columns_keep_shape_but_lose_pair_trends(wine):
    rng = np.random.default_rng(0)
    shuffled = pd.DataFrame({c: rng.permutation(wine[c].to_numpy()) for c in wine.columns})
    copula = GaussianCopula().fit(wine).sample(len(wine), seed=0)
    independent = IndependentMarginals().fit(wine).sample(len(wine), seed=0)
    f_shuf, f_cop, f_ind = fidelity(wine, shuffled), fidelity(wine, copula), fidelity(wine, independent)
    assert f_shuf["shape"] == 1.0
    assert f_shuf["pair_trends"] < f_cop["pair_trends"] - 0.05
    assert f_ind["pair_trends"] < f_cop["pair_trends"] - 0.05
    assert f_cop["shape"] > 0.85 and f_ind["shape"] > 0.85
    assert f_cop["pair_trends"] > 0.88


def test_fidelity_on_mixed_types_flags_a_shifted_column():
    real = mixed_table(500, seed=0)
    synth = mixed_table(500, seed=1)
    synth["count"] = synth["count"] + 4
    f = fidelity(real, synth)
    scores = {c: d["score"] for c, d in f["columns"].items()}
    assert scores["count"] < 0.3
    assert min(v for c, v in scores.items() if c != "count") > 0.85
    metrics = {tuple(p["columns"]): p["metric"] for p in f["pairs"]}
    assert metrics[("x", "y")] == "correlation" and metrics[("x", "when")] == "correlation"
    assert metrics[("x", "colour")] == "contingency" and metrics[("flag", "city")] == "contingency"
    pair = next(p for p in f["pairs"] if p["columns"] == ["x", "y"])
    assert pair["real"] == pytest.approx(real["x"].corr(real["y"]))
    assert all(0 <= p["score"] <= 1 for p in f["pairs"])
    json.dumps(f, allow_nan=False)


def test_fidelity_caps_pairs_on_wide_tables():
    rng = np.random.default_rng(0)
    wide = pd.DataFrame(rng.normal(size=(50, 30)), columns=[f"c{i}" for i in range(30)])
    f = fidelity(wide, wide)
    assert f["n_pairs_total"] == 435 and f["n_pairs_scored"] == 300 and len(f["pairs"]) == 300
    assert fidelity(wide, wide, max_pairs=10)["n_pairs_scored"] == 10
    with pytest.raises(DataError, match="lacks column"):
        fidelity(wide, wide.drop(columns=["c3"]))


# ---------------------------------------------------------------------------------------------- utility
def test_utility_of_the_real_data_equals_train_on_real(cancer_thirds):
    train, holdout, _ = cancer_thirds
    u = utility(train, train.copy(), holdout, "target")
    assert u["task"] == "classification" and u["metric"] == "macro_f1"
    assert set(u["models"]) == {"hist_gradient_boosting", "logistic_regression"}
    for m in u["models"].values():
        assert m["real"] == m["synthetic"] and m["gap_points"] == {"accuracy": 0.0, "macro_f1": 0.0}
        assert m["real"]["accuracy"] > 0.85
    assert u["gap_points"] == 0.0 and u["n_test"] == len(holdout)


def test_utility_gap_shows_lost_relationships(cancer_thirds):
    train, holdout, _ = cancer_thirds
    independent = IndependentMarginals().fit(train).sample(len(train), seed=0)
    u = utility(train, independent, holdout, "target")
    assert u["gap_points"] > 10
    single = train[train["target"] == "benign"]
    one_class = utility(train, single, holdout, "target")
    assert "error" in one_class["models"]["logistic_regression"]["synthetic"]
    assert one_class["synthetic"] is None


def test_utility_regression(wine):
    train, test = wine[:120], wine[120:]
    u = utility(train, GaussianCopula().fit(train).sample(120, seed=0), test, "alcohol")
    assert u["task"] == "regression" and set(u["models"]) == {"hist_gradient_boosting", "ridge"}
    assert set(u["models"]["ridge"]["real"]) == {"r2"}
    assert u["gap_points"] == pytest.approx(100 * (u["real"] - u["synthetic"]))
    coded = wine[["alcohol", "proline", "hue"]].assign(target=wine["target"].str[-1].astype(int))
    assert utility(coded, coded, coded, "target")["task"] == "regression"
    as_class = utility(coded, coded, coded, "target", kinds={"target": "categorical"})
    assert as_class["task"] == "classification" and as_class["real"] > 0.8


# ---------------------------------------------------------------------------------------------- privacy
def test_privacy_counts_copies_and_the_attack_finds_members(cancer_thirds):
    train, holdout, _ = cancer_thirds
    copied = train.sample(100, random_state=0)
    p = privacy(train, copied, holdout)
    assert p["exact_copies"] == 100 and p["exact_copy_share"] == 1.0 and p["holdout_exact_copies"] == 0
    assert p["dcr_synthetic_median"] < 1e-6 and p["nndr_synthetic_median"] < 1e-3
    assert p["share_closer_than_holdout_median"] == 1.0
    assert p["mia_auc"] > 0.7
    assert privacy(train, train, holdout)["mia_auc"] > 0.99


def test_privacy_of_fresh_samples_from_the_same_distribution(cancer_thirds):
    train, holdout, fresh = cancer_thirds
    p = privacy(train, fresh, holdout)
    assert p["exact_copies"] == 0
    assert 0.8 < p["dcr_synthetic_median"] / p["dcr_holdout_median"] < 1.25
    assert 0.3 < p["share_closer_than_holdout_median"] < 0.7
    assert 0.4 < p["mia_auc"] < 0.6
    assert abs(p["nndr_synthetic_median"] - p["nndr_holdout_median"]) < 0.1


def test_distance_is_rms_gower_with_missing_values():
    train = pd.DataFrame({"num": [0.0, 10.0], "cat": ["a", "b"], "opt": [1.0, 1.0], "day": pd.to_datetime(["2024-01-01"] * 2)})
    synth = pd.DataFrame({"num": [5.0], "cat": ["a"], "opt": [np.nan], "day": pd.to_datetime(["2024-01-01"])})
    holdout = pd.DataFrame({"num": [0.0], "cat": ["c"], "opt": [1.0], "day": pd.to_datetime(["2024-01-01"])})
    p = privacy(train, synth, holdout)
    # to row 0: num 0.5 (half the range), cat 0, opt missing vs present (0.5^2 + 0.75 = 1), day 0
    assert p["dcr_synthetic_median"] == pytest.approx(np.sqrt((0.25 + 0 + 1 + 0) / 4))
    assert p["dcr_holdout_median"] == pytest.approx(np.sqrt(1 / 4))  # only the unseen category differs
    assert p["nndr_holdout_median"] == pytest.approx(np.sqrt(1 / 4) / np.sqrt(2 / 4))


# ----------------------------------------------------------------------------------------------- report
def test_report_compares_generators_and_writes_files(cancer_thirds, tmp_path):
    train, holdout, fresh = cancer_thirds
    cols = ["mean radius", "mean texture", "mean smoothness", "worst area", "worst concavity", "target"]
    train, holdout, fresh = train[cols], holdout[cols], fresh[cols]
    out = tmp_path / "rep"
    rep = report(train, fresh, holdout=holdout, target="target", out=out)
    assert set(rep["summary"]) == {"synthetic", "independent_marginals", "gaussian_copula"}
    s = rep["summary"]
    assert s["gaussian_copula"]["fidelity.pair_trends"] > s["independent_marginals"]["fidelity.pair_trends"]
    assert s["synthetic"]["utility.gap_points"] < s["independent_marginals"]["utility.gap_points"]
    assert {"fidelity", "utility", "privacy"} <= set(rep["generators"]["gaussian_copula"])
    names = {p.name for p in out.iterdir()}
    assert names == {"report.json", "report.html", "shapes.png", "pair_trends.png", "correlations.png", "dcr.png"}
    saved = json.loads((out / "report.json").read_text())
    assert saved["summary"] == rep["summary"] and len(saved["files"]) == 6
    page = (out / "report.html").read_text()
    for name in ("synthetic", "independent_marginals", "gaussian_copula", "mean radius", "mia_auc"):
        assert name in page
    assert page.count("data:image/png;base64,") == 4
    assert all((out / n).stat().st_size > 1000 for n in names)


def test_report_without_baselines_or_holdout(wine, tmp_path):
    rep = report(wine, wine, baselines=False)
    assert list(rep["generators"]) == ["synthetic"] and set(rep["generators"]["synthetic"]) == {"fidelity"}
    assert rep["summary"]["synthetic"] == {"fidelity.shape": 1.0, "fidelity.pair_trends": 1.0, "fidelity.overall": 1.0}
    with pytest.raises(InvalidParameterError, match="holdout"):
        report(wine, wine, target="target")
    with pytest.raises(DataError, match="target column"):
        report(wine, wine, holdout=wine, target="nope")
