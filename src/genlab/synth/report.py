"""Is a synthetic table faithful, useful and not a copy of real people? Measured, side by side with baselines.

- fidelity: per-column shape (1 - KS statistic, or 1 - total variation) and pair trends (correlation or
  contingency similarity), as in SDMetrics' quality report.
- utility: train on synthetic, test on real (TSTR) against train on real, test on real (TRTR).
- privacy: exact copies, distance to closest record (DCR), nearest-neighbour distance ratio (NNDR) and a
  distance-based membership-inference attack. Distances are RMS-Gower: each column contributes a
  distance in [0, 1] (numbers scaled by the training range, categories 0/1), combined as
  sqrt(mean of squares) so a BLAS-backed Euclidean nearest-neighbour search computes them exactly.
"""

from __future__ import annotations

import base64
import html
import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

from genlab.errors import DataError, InvalidParameterError
from genlab.fsutil import atomic_write_text, save_figure, write_json
from genlab.synth.baselines import CONTINUOUS, GaussianCopula, IndependentMarginals, infer_kinds, to_float

MISSING = "\x00<missing>"


def _kinds_for(real, other, kinds, what: str = "synthetic") -> dict:
    if not isinstance(other, pd.DataFrame):
        raise DataError(f"the {what} table must be a pandas DataFrame, got {type(other).__name__}")
    out = infer_kinds(real, kinds)
    absent = [str(c) for c in real.columns if c not in other.columns]
    if absent:
        raise DataError(f"the {what} table lacks column(s) of the real table: {', '.join(absent[:10])}")
    if len(real) == 0 or len(other) == 0:
        raise DataError(f"cannot compare empty tables ({len(real)} real rows, {len(other)} {what} rows)")
    return out


def _as_str(s: pd.Series) -> np.ndarray:
    """Category values as strings (so True, 'True' and a category 'True' agree); MISSING for missing."""
    present = s.notna().to_numpy()
    out = np.full(len(s), MISSING, dtype=object)
    out[present] = s[present].astype(str).to_numpy(dtype=object)
    return out


def _jsonable(x):
    """Numpy scalars -> Python, NaN -> None, recursively: the report must be strict JSON."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    return x


# ----------------------------------------------------------------------------------------- fidelity
class _Column:
    """A column of the real and the synthetic table as shared integer codes (and floats if continuous)."""

    def __init__(self, real: pd.Series, synth: pd.Series, kind: str, bins: int):
        self.continuous = kind in CONTINUOUS
        if self.continuous:
            self.xr, self.xs = to_float(real, kind), to_float(synth, kind)
            present = self.xr[~np.isnan(self.xr)]
            edges = np.unique(np.quantile(present, np.linspace(0, 1, bins + 1))[1:-1]) if len(present) else []
            self.cr, self.cs = (np.where(np.isnan(x), -1, np.searchsorted(edges, x, side="right")) for x in (self.xr, self.xs))
            self.k = len(edges) + 1
        else:
            r, s = _as_str(real), _as_str(synth)
            cats = pd.Index(sorted(set(r) | set(s) - {MISSING}))
            self.cr, self.cs = (np.where(v == MISSING, -1, cats.get_indexer(v)) for v in (r, s))
            self.k = max(len(cats), 1)

    def shape(self) -> float:
        if self.continuous:
            a, b = self.xr[~np.isnan(self.xr)], self.xs[~np.isnan(self.xs)]
            if len(a) == 0 or len(b) == 0:
                return float(len(a) == len(b))
            return 1.0 - float(ks_2samp(a, b).statistic)
        return _tvd_complement(self.cr, self.cs, self.k)


def _tvd_complement(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """1 - total variation distance between the distributions of codes a and b (codes < 0 = missing)."""
    a, b = a[a >= 0], b[b >= 0]
    if len(a) == 0 or len(b) == 0:
        return float(len(a) == len(b))
    p, q = np.bincount(a, minlength=k) / len(a), np.bincount(b, minlength=k) / len(b)
    return 1.0 - 0.5 * float(np.abs(p - q).sum())


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    m = ~(np.isnan(x) | np.isnan(y))
    x, y = x[m], y[m]
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return 0.0  # a constant or absent pair has no linear trend
    return float(np.corrcoef(x, y)[0, 1])


def _pair(a: _Column, b: _Column) -> dict:
    if a.continuous and b.continuous:
        cr, cs = _corr(a.xr, b.xr), _corr(a.xs, b.xs)
        return {"metric": "correlation", "score": 1.0 - abs(cr - cs) / 2, "real": cr, "synthetic": cs}
    joint = [np.where((x >= 0) & (y >= 0), x * b.k + y, -1) for x, y in ((a.cr, b.cr), (a.cs, b.cs))]
    return {"metric": "contingency", "score": _tvd_complement(joint[0], joint[1], a.k * b.k)}


def fidelity(real: pd.DataFrame, synth: pd.DataFrame, kinds: dict[str, str] | None = None,
             max_pairs: int = 300, bins: int = 10, seed: int = 0) -> dict:
    """Column shapes and pair trends of `synth` against `real`, each in [0, 1] (1 = identical)."""
    kinds = _kinds_for(real, synth, kinds)
    if max_pairs < 0 or bins < 2:
        raise InvalidParameterError(f"max_pairs must be >= 0 and bins >= 2, got {max_pairs} and {bins}")
    cols = list(real.columns)
    enc = [_Column(real[c], synth[c], kinds[c], bins) for c in cols]
    columns = {str(c): {"kind": kinds[c], "metric": "KS" if e.continuous else "TVD", "score": e.shape(),
                        "missing_real": float(real[c].isna().mean()), "missing_synthetic": float(synth[c].isna().mean())}
               for c, e in zip(cols, enc)}
    pairs = list(itertools.combinations(range(len(cols)), 2))
    n_total = len(pairs)
    if len(pairs) > max_pairs:  # wide tables: a seeded random subset of the pairs
        keep = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(keep)]
    details = [{"columns": [str(cols[i]), str(cols[j])], **_pair(enc[i], enc[j])} for i, j in pairs]
    shape = float(np.mean([v["score"] for v in columns.values()]))
    trends = float(np.mean([p["score"] for p in details])) if details else None
    return _jsonable({"shape": shape, "pair_trends": trends,
                      "overall": shape if trends is None else (shape + trends) / 2,
                      "columns": columns, "pairs": details, "n_pairs_total": n_total, "n_pairs_scored": len(details)})


# ------------------------------------------------------------------------------------------ utility
def _frame(df: pd.DataFrame, num: list, cat: list, kinds: dict) -> pd.DataFrame:
    data = {f"n{i}": to_float(df[c], kinds[c]) for i, c in enumerate(num)}
    data.update({f"c{i}": _as_str(df[c]) for i, c in enumerate(cat)})
    return pd.DataFrame(data, index=range(len(df)))


def _models(task: str, seed: int) -> dict:
    from sklearn import ensemble, linear_model

    if task == "classification":
        return {"hist_gradient_boosting": ensemble.HistGradientBoostingClassifier(random_state=seed),
                "logistic_regression": linear_model.LogisticRegression(max_iter=2000)}
    return {"hist_gradient_boosting": ensemble.HistGradientBoostingRegressor(random_state=seed),
            "ridge": linear_model.Ridge(alpha=1.0)}


def _utility(real_train, synth, real_test, target, kinds, seed, task, real_cache: dict | None) -> dict:
    from sklearn import metrics
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    kinds = _kinds_for(real_train, synth, kinds)
    _kinds_for(real_train, real_test, kinds, "real test")
    if target not in real_train.columns:
        raise DataError(f"target column {target!r} is not in the real table")
    task = task or ("regression" if kinds[target] in CONTINUOUS else "classification")
    if task not in ("classification", "regression"):
        raise InvalidParameterError(f"task must be 'classification' or 'regression', got {task!r}")
    features = [c for c in real_train.columns if c != target]
    num = [c for c in features if kinds[c] in CONTINUOUS]
    cat = [c for c in features if kinds[c] not in CONTINUOUS]
    frames = [real_train, synth, real_test]
    # one encoder for all three tables: categories are the union, so every design matrix has the same columns
    categories = [sorted(set().union(*(set(_as_str(f[c])) for f in frames))) for c in cat]

    def xy(df):
        y = to_float(df[target], kinds[target]) if task == "regression" else _as_str(df[target])
        keep = ~np.isnan(y) if task == "regression" else y != MISSING
        return _frame(df[keep.tolist()], num, cat, kinds), y[keep]

    (xr, yr), (xs, ys), (xt, yt) = (xy(f) for f in frames)

    def score(name, model, x, y) -> dict:
        if task == "classification" and len(set(y)) < 2:
            return {"error": f"the training labels hold {len(set(y))} class(es); a classifier needs 2"}
        pre = ColumnTransformer([
            ("num", make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler()),
             [f"n{i}" for i in range(len(num))]),
            ("cat", OneHotEncoder(categories=categories, handle_unknown="ignore", sparse_output=False),
             [f"c{i}" for i in range(len(cat))])])
        pred = make_pipeline(pre, model).fit(x, y).predict(xt)
        if task == "regression":
            return {"r2": float(metrics.r2_score(yt, pred))}
        return {"accuracy": float(metrics.accuracy_score(yt, pred)),
                "macro_f1": float(metrics.f1_score(yt, pred, average="macro"))}

    real_cache = {} if real_cache is None else real_cache
    out = {}
    for name, model in _models(task, seed).items():
        if name not in real_cache:
            real_cache[name] = score(name, model, xr, yr)
        real, syn = real_cache[name], score(name, _models(task, seed)[name], xs, ys)
        gap = {k: 100 * (real[k] - syn[k]) for k in real if k in syn and k != "error"}
        out[name] = {"real": real, "synthetic": syn, "gap_points": gap}
    metric = "r2" if task == "regression" else "macro_f1"
    avg = {side: np.mean([m[side].get(metric, np.nan) for m in out.values()]) for side in ("real", "synthetic")}
    return _jsonable({"task": task, "target": str(target), "metric": metric, "models": out,
                      "n_train_real": len(yr), "n_train_synthetic": len(ys), "n_test": len(yt),
                      "real": avg["real"], "synthetic": avg["synthetic"],
                      "gap_points": 100 * (avg["real"] - avg["synthetic"])})


def utility(real_train: pd.DataFrame, synth: pd.DataFrame, real_test: pd.DataFrame, target: str,
            kinds: dict[str, str] | None = None, seed: int = 0, task: str | None = None) -> dict:
    """Train-on-synthetic vs train-on-real, both tested on `real_test`; gaps in points (real - synthetic)."""
    return _utility(real_train, synth, real_test, target, kinds, seed, task, None)


# ------------------------------------------------------------------------------------------ privacy
class _DistanceSpace:
    """Encodes rows so that Euclidean distance / sqrt(n_columns) is the RMS-Gower distance."""

    def __init__(self, train: pd.DataFrame, kinds: dict, others: list[pd.DataFrame]):
        self.cols, self.kinds, self.scale, self.cats, self.flag = list(train.columns), kinds, {}, {}, {}
        for c in self.cols:
            if kinds[c] in CONTINUOUS:
                x = to_float(train[c], kinds[c])
                lo, hi = (np.nanmin(x), np.nanmax(x)) if (~np.isnan(x)).any() else (0.0, 1.0)
                self.scale[c] = (lo, hi - lo if hi > lo else 1.0)
                self.flag[c] = any(f[c].isna().any() for f in [train, *others])
            else:
                self.cats[c] = pd.Index(sorted(set().union(*(set(_as_str(f[c])) for f in [train, *others]))))

    def encode(self, df: pd.DataFrame) -> np.ndarray:
        parts = []
        for c in self.cols:
            if c in self.scale:
                lo, rng = self.scale[c]
                x = (to_float(df[c], self.kinds[c]) - lo) / rng
                miss = np.isnan(x)
                parts.append(np.where(miss, 0.5, x)[:, None])
                if self.flag[c]:  # present vs missing: squared distance (x - 0.5)^2 + 0.75, in [0.75, 1]
                    parts.append(np.sqrt(0.75) * miss[:, None])
            else:
                onehot = np.zeros((len(df), len(self.cats[c])))
                onehot[np.arange(len(df)), self.cats[c].get_indexer(_as_str(df[c]))] = np.sqrt(0.5)
                parts.append(onehot)
        return np.hstack(parts) / np.sqrt(len(self.cols))

    def keys(self, df: pd.DataFrame) -> np.ndarray:
        """One hash per row after rounding numbers to 1e-9 of the training range: equal rows, equal hashes."""
        data = {}
        for i, c in enumerate(self.cols):
            if c in self.scale:
                lo, rng = self.scale[c]
                data[i] = np.round((to_float(df[c], self.kinds[c]) - lo) / rng, 9)
            else:
                data[i] = _as_str(df[c])
        return pd.util.hash_pandas_object(pd.DataFrame(data), index=False).to_numpy()


def _nearest(reference: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=min(k, len(reference)), algorithm="brute").fit(reference)
    return nn.kneighbors(query, return_distance=True)[0]


def _privacy(train, synth, holdout, kinds, seed) -> tuple[dict, dict]:
    from sklearn.metrics import roc_auc_score

    kinds = _kinds_for(train, synth, kinds)
    _kinds_for(train, holdout, kinds, "holdout")
    space = _DistanceSpace(train, kinds, [synth, holdout])
    t, s, h = (space.encode(f) for f in (train, synth, holdout))
    train_keys = space.keys(train)
    copies = int(np.isin(space.keys(synth), train_keys).sum())
    holdout_copies = int(np.isin(space.keys(holdout), train_keys).sum())
    d = _nearest(t, np.vstack([s, h]), 2)  # one search for both query sets
    ds, dh = d[:len(s)], d[len(s):]

    def nndr(d):  # nearest / second nearest; 0 when both are 0 (a copy of a duplicated record)
        return np.divide(d[:, 0], d[:, 1], out=np.zeros(len(d)), where=d[:, 1] > 0) if d.shape[1] > 1 else None

    rng = np.random.default_rng(seed)
    m = min(len(train), len(holdout))
    members, others = rng.choice(len(train), m, replace=False), rng.choice(len(holdout), m, replace=False)
    # the attacker scores a record by how close the synthetic data comes to it: members should not be closer
    d_attack = _nearest(s, np.vstack([t[members], h[others]]), 1)[:, 0]
    auc = roc_auc_score(np.r_[np.ones(m), np.zeros(m)], -d_attack)
    nr, nh = nndr(ds), nndr(dh)
    out = {"distance": "rms_gower", "n_train": len(train), "n_synthetic": len(synth), "n_holdout": len(holdout),
           "exact_copies": copies, "exact_copy_share": copies / len(synth),
           "holdout_exact_copies": holdout_copies, "holdout_exact_copy_share": holdout_copies / len(holdout),
           "dcr_synthetic_median": np.median(ds[:, 0]), "dcr_synthetic_p5": np.percentile(ds[:, 0], 5),
           "dcr_holdout_median": np.median(dh[:, 0]), "dcr_holdout_p5": np.percentile(dh[:, 0], 5),
           "share_closer_than_holdout_median": float(np.mean(ds[:, 0] < np.median(dh[:, 0]))),
           "nndr_synthetic_median": None if nr is None else np.median(nr),
           "nndr_holdout_median": None if nh is None else np.median(nh),
           "mia_auc": auc, "mia_members": m}
    return _jsonable(out), {"synthetic": ds[:, 0], "holdout": dh[:, 0]}


def privacy(train: pd.DataFrame, synth: pd.DataFrame, holdout: pd.DataFrame,
            kinds: dict[str, str] | None = None, seed: int = 0) -> dict:
    """Copies, distances to the closest training record, NNDR and membership-inference AUC (0.5 = no leak)."""
    return _privacy(train, synth, holdout, kinds, seed)[0]


# ------------------------------------------------------------------------------------------- report
SUMMARY_KEYS = {"fidelity": ("shape", "pair_trends", "overall"),
                "utility": ("real", "synthetic", "gap_points"),
                "privacy": ("exact_copies", "exact_copy_share", "holdout_exact_copy_share", "dcr_synthetic_median",
                            "dcr_holdout_median",
                            "share_closer_than_holdout_median", "nndr_synthetic_median", "mia_auc")}


def report(real_train: pd.DataFrame, synth: pd.DataFrame, holdout: pd.DataFrame | None = None,
           target: str | None = None, baselines: bool = True, kinds: dict[str, str] | None = None,
           seed: int = 0, out=None) -> dict:
    """Fidelity, utility (with `target`) and privacy (with `holdout`) of `synth` and, if `baselines`,
    of IndependentMarginals and GaussianCopula fitted on `real_train`; files in folder `out` if given."""
    kinds = _kinds_for(real_train, synth, kinds)
    if target is not None and holdout is None:
        raise InvalidParameterError("utility needs a holdout table: pass holdout= (the real test set) with target=")
    if target is not None and target not in real_train.columns:
        raise DataError(f"target column {target!r} is not in the real table")
    generators = {"synthetic": synth[list(real_train.columns)]}
    if baselines:
        for name, cls in (("independent_marginals", IndependentMarginals), ("gaussian_copula", GaussianCopula)):
            generators[name] = cls().fit(real_train, kinds, seed=seed).sample(len(synth), seed=seed)
    results, distances, cache = {}, {}, {}
    for name, df in generators.items():
        res = {"fidelity": fidelity(real_train, df, kinds, seed=seed)}
        if target is not None:
            res["utility"] = _utility(real_train, df, holdout, target, kinds, seed, None, cache)
        if holdout is not None:
            res["privacy"], distances[name] = _privacy(real_train, df, holdout, kinds, seed)
        results[name] = res
    summary = {name: {f"{part}.{k}": res[part][k] for part, keys in SUMMARY_KEYS.items() if part in res for k in keys}
               for name, res in results.items()}
    rep = _jsonable({"n_real_train": len(real_train), "n_synthetic": len(synth),
                     "n_holdout": None if holdout is None else len(holdout), "target": target, "seed": seed,
                     "kinds": {str(c): k for c, k in kinds.items()}, "summary": summary, "generators": results})
    if out is not None:
        rep["files"] = write_report(out, rep, real_train, generators, distances, kinds)
    return rep


# ---------------------------------------------------------------------------------- files: plots, HTML
def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _plot_shapes(rep: dict, png: Path, limit: int = 40) -> Path:
    names = list(rep["generators"])
    cols = list(rep["generators"][names[0]]["fidelity"]["columns"])
    score = {n: [rep["generators"][n]["fidelity"]["columns"][c]["score"] for c in cols] for n in names}
    cols = [cols[i] for i in np.argsort(score[names[0]], kind="stable")[:limit]]  # the worst columns first
    fig, (ax,) = _figure(8, 1.5 + 0.3 * len(cols) * max(1, len(names) / 2))
    width = 0.8 / len(names)
    for k, n in enumerate(names):
        vals = [rep["generators"][n]["fidelity"]["columns"][c]["score"] for c in cols]
        ax.barh(np.arange(len(cols)) + k * width, vals, height=width, label=n)
    ax.set_yticks(np.arange(len(cols)) + 0.4 - width / 2, cols, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("column shape score (1 - KS or 1 - TVD)")
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, png)


def _heatmaps(mats: dict, labels: list, png: Path, vmin: float, cmap: str, title: str) -> Path:
    fig, axes = _figure(4.2 * len(mats), 4.0, len(mats))
    for ax, (name, mat) in zip(axes, mats.items()):
        im = ax.imshow(mat, vmin=vmin, vmax=1, cmap=cmap)
        ax.set_title(name, fontsize=9)
        ticks = np.arange(len(labels)) if len(labels) <= 30 else []
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=6)
        ax.set_yticks(ticks, [labels[i] for i in ticks] if ax is axes[0] else [], fontsize=6)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, png)


def _plot_pair_trends(rep: dict, png: Path, limit: int = 30) -> Path | None:
    first = next(iter(rep["generators"].values()))["fidelity"]
    labels = list(first["columns"])[:limit]
    if len(labels) < 2:
        return None
    index, mats = {c: i for i, c in enumerate(labels)}, {}
    for name, res in rep["generators"].items():
        mat = np.full((len(labels), len(labels)), np.nan)
        np.fill_diagonal(mat, 1.0)
        for p in res["fidelity"]["pairs"]:
            a, b = p["columns"]
            if a in index and b in index:
                mat[index[a], index[b]] = mat[index[b], index[a]] = p["score"]
        mats[name] = mat
    return _heatmaps(mats, labels, png, 0.5, "viridis", "pair-trend score (1 = same trend as the real data)")


def _plot_correlations(real, generators, kinds, png: Path, limit: int = 30) -> Path | None:
    cols = [c for c in real.columns if kinds[c] in CONTINUOUS][:limit]
    if len(cols) < 2:
        return None
    mats = {name: pd.DataFrame({str(c): to_float(df[c], kinds[c]) for c in cols}).corr().to_numpy()
            for name, df in {"real": real, **generators}.items()}
    return _heatmaps(mats, [str(c) for c in cols], png, -1, "RdBu_r", "Pearson correlation of numeric columns")


def _plot_dcr(distances: dict, png: Path) -> Path | None:
    if not distances:
        return None
    fig, axes = _figure(4.2 * len(distances), 3.2, len(distances))
    top = max(max(d["synthetic"].max(), d["holdout"].max()) for d in distances.values())
    bins = np.linspace(0, top if top > 0 else 1, 40)
    for ax, (name, d) in zip(axes, distances.items()):
        ax.hist(d["holdout"], bins=bins, alpha=0.6, density=True, label="holdout -> train")
        ax.hist(d["synthetic"], bins=bins, alpha=0.6, density=True, label=f"{name} -> train")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("distance to closest training record", fontsize=8)
        ax.legend(fontsize=7)
    return save_figure(fig, png)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape("" if v is None else str(v))


def _table(header: list, rows: list) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(rep: dict, images: dict) -> str:
    names = list(rep["generators"])
    keys = list(next(iter(rep["summary"].values())))
    parts = ["<h2>Summary</h2>", _table(["generator", *keys], [[n, *rep["summary"][n].values()] for n in names])]
    cols = list(rep["generators"][names[0]]["fidelity"]["columns"].items())
    parts += ["<h2>Column shapes</h2>", _table(["column", "kind", "metric", *names], [
        [c, d["kind"], d["metric"], *(rep["generators"][n]["fidelity"]["columns"][c]["score"] for n in names)]
        for c, d in cols])]
    if "utility" in rep["generators"][names[0]]:
        u0 = rep["generators"][names[0]]["utility"]
        rows = [[n, m, u0["metric"], r["real"].get(u0["metric"]), r["synthetic"].get(u0["metric"]),
                 r["gap_points"].get(u0["metric"]), r["synthetic"].get("error")]
                for n in names for m, r in rep["generators"][n]["utility"]["models"].items()]
        parts += [f"<h2>Utility (target {html.escape(u0['target'])}, {u0['task']})</h2>",
                  _table(["generator", "model", "metric", "train real", "train synthetic", "gap (points)", "error"], rows)]
    if "privacy" in rep["generators"][names[0]]:
        pkeys = [k for k in rep["generators"][names[0]]["privacy"] if k != "distance"]
        parts += ["<h2>Privacy (RMS-Gower distances)</h2>",
                  _table(["metric", *names], [[k, *(rep["generators"][n]["privacy"][k] for n in names)] for k in pkeys])]
    for title, path in images.items():
        data = base64.b64encode(Path(path).read_bytes()).decode()
        parts += [f"<h2>{html.escape(title)}</h2>", f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">']
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>genlab synthetic data report</title>"
            f"<style>{style}</style></head><body><h1>Synthetic data report</h1>"
            f"<p>{rep['n_real_train']} real training rows, {rep['n_synthetic']} synthetic rows, holdout: "
            f"{rep['n_holdout']}, generators: {', '.join(html.escape(n) for n in names)}.</p>{''.join(parts)}</body></html>")


def write_report(out, rep: dict, real, generators: dict, distances: dict, kinds: dict) -> list[str]:
    """report.json, report.html (images embedded) and the PNG plots in folder `out`, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = {"Column shapes": _plot_shapes(rep, out / "shapes.png"),
              "Pair trends": _plot_pair_trends(rep, out / "pair_trends.png"),
              "Correlations": _plot_correlations(real, generators, kinds, out / "correlations.png"),
              "Distance to closest record": _plot_dcr(distances, out / "dcr.png")}
    images = {k: v for k, v in images.items() if v is not None}
    files = [str(p) for p in images.values()] + [str(out / "report.html"), str(out / "report.json")]
    atomic_write_text(out / "report.html", _html(rep, images))
    write_json(out / "report.json", {**rep, "files": files})
    return files
