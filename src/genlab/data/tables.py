"""Real tables for synthetic-record work: bundled ones (shipped inside statsmodels and
scikit-learn, so nothing is downloaded) and the user's own CSV / Parquet files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from genlab.errors import DataError

BUNDLED_TABLES = ("randhie", "heart", "breast_cancer", "wine")


def _statsmodels(name: str) -> pd.DataFrame:
    from statsmodels import datasets

    return getattr(datasets, name).load_pandas().data.copy()


def _sklearn_with_class(loader: str, column: str) -> pd.DataFrame:
    """A scikit-learn dataset as one frame; the integer target becomes a named categorical column."""
    from sklearn import datasets

    bunch = getattr(datasets, loader)(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    labels = [str(name) for name in bunch.target_names]
    frame[column] = pd.Categorical.from_codes(bunch.target.to_numpy(), categories=labels)
    return frame


def bundled_table(name: str) -> pd.DataFrame:
    """A bundled real table by name (see BUNDLED_TABLES).

    randhie: RAND health insurance experiment, 20,190 people x 10 (statsmodels).
    heart: Stanford heart transplant survival, 69 x 3 (statsmodels).
    breast_cancer: Wisconsin diagnostic, 569 x 30 measurements + "diagnosis" malignant/benign.
    wine: UCI wine, 178 x 13 measurements + "cultivar" class_0 / class_1 / class_2.
    """
    if name in ("randhie", "heart"):
        return _statsmodels(name)
    if name == "breast_cancer":
        return _sklearn_with_class("load_breast_cancer", "diagnosis")
    if name == "wine":
        return _sklearn_with_class("load_wine", "cultivar")
    raise DataError(f"unknown bundled table {name!r} (choose one of: {', '.join(BUNDLED_TABLES)})")


def read_table(path: str | Path) -> pd.DataFrame:
    """A .csv or .parquet file as a DataFrame; anything else, or an unreadable file, is a DataError
    naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise DataError(f"{path}: unsupported table format {suffix or '(no extension)'!r} (use .csv or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except Exception as e:  # parser errors of either format: one line naming the file
        raise DataError(f"{path}: unreadable {suffix[1:]} file ({type(e).__name__}: {e})") from None
