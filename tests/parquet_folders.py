"""Parquet output folders read as one table with pandas, pyarrow, Ray Data and DuckDB (docs/schemas.md)."""

from __future__ import annotations

from pathlib import Path

# DuckDB reads every match of its glob: the plain one, as a user types it (the only Parquet sidecar lives in ``_skipped/``)
DUCKDB_GLOB = "*.parquet"


def assert_one_table(folder: str | Path, rows: int, ray_data: bool = False) -> None:
    """``folder`` (a job's real output) holds only Parquet parts besides ``_``/``.`` sidecars, and each reader
    sees ``rows`` rows in it."""
    import duckdb
    import pandas as pd
    import pyarrow.parquet as pq

    folder = Path(folder)
    strays = sorted(p.name for p in folder.iterdir() if not p.name.startswith(("_", ".")) and not p.name.endswith(".parquet"))
    assert not strays, f"'{folder}' holds files that are neither Parquet parts nor _/. sidecars: {strays}"
    assert len(pd.read_parquet(folder)) == rows, "pandas"
    assert pq.read_table(folder).num_rows == rows, "pyarrow"
    assert duckdb.sql(f"select count(*) from read_parquet('{folder}/{DUCKDB_GLOB}')").fetchall() == [(rows,)], "duckdb"
    if ray_data:
        import ray

        assert ray.data.read_parquet(str(folder)).count() == rows, "Ray Data"
