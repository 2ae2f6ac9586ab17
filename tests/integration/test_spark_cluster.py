"""The batch jobs on a Spark standalone cluster give what they give on local[2].

A real cluster (`batch.spark_cluster`: a master and two one-core workers on loopback,
started from pyspark's own `spark-class`) runs `inkling features`, `inkling
training-set` and `inkling embeddings` as a user would run them (`--master
spark://...`), on a copy of the same event log that local[2] runs them on; every output
table must hold the same rows, and the ALS vectors the same values to float tolerance.
The jobs run in a subprocess per master (`inkling.cli.main` for each command line, as a
scheduler would run them in a row): one process holds one SparkContext, and the test's
own local session (other modules' fixture) must not be the one the jobs reuse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from batch.spark_cluster import StandaloneCluster
from inkling.models.embeddings import load_embeddings
from tests.conftest import temp_settings

pytestmark = [pytest.mark.spark, pytest.mark.slow]

JOB_TIMEOUT_S = 600


JOBS = [
    ["features"],
    ["apply"],
    ["training-set", "--feature-service", "ranker_v1"],
    ["embeddings", "--iterations", "5"],
]
"""The commands each run gives, in order, as `inkling` command lines."""

RUN_JOBS = """
import json, os, sys
from inkling.cli import main
environment = dict(os.environ)
for args in json.loads(sys.argv[1]):
    if main(args) != 0:
        sys.exit(f"inkling {' '.join(args)} failed")
    os.environ.clear()  # as a new process would start: a command exports the address of
    os.environ.update(environment)  # the private Redis it started, and stopped
"""


def inkling(settings_root: Path, master: str, *jobs: list[str]) -> None:
    """Run `jobs` (command lines) one after another in one process (one JVM start, as a
    scheduler running them in a row would), with `master` as INKLING_SPARK_MASTER."""
    settings = temp_settings(settings_root)
    env = {
        **os.environ,
        "INKLING_DATA_DIR": str(settings.data_dir),
        "INKLING_FEATURE_REPO": str(settings.feature_repo),
        "INKLING_SPARK_MASTER": master,
        "OTEL_SDK_DISABLED": "true",
    }
    env.pop("INKLING_REDIS_ADDRESS", None)  # each command starts its own private Redis
    done = subprocess.run(
        [sys.executable, "-c", RUN_JOBS, json.dumps(jobs)],
        env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{jobs} on {master}:\n{done.stderr[-3000:]}"


def table(path: Path) -> pd.DataFrame:
    """A Parquet dataset's rows in a canonical order (columns sorted by name, rows by
    every column that sorts), list columns compared as tuples."""
    frame = ds.dataset(str(path), format="parquet").to_table().to_pandas()
    frame = frame[sorted(frame.columns)]
    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, list | np.ndarray)).any():
            frame[column] = frame[column].map(lambda v: tuple(v) if v is not None else None)
    keys = [c for c in frame.columns if frame[c].map(lambda v: not isinstance(v, float)).all()]
    return frame.sort_values(keys).reset_index(drop=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same generated log through the three jobs on local[2] and on the cluster;
    each run's data directory."""
    root = tmp_path_factory.mktemp("spark-cluster")
    local, cluster = root / "local", root / "cluster"
    inkling(local, "local[2]", ["generate", "--users", "150", "--items", "400",
            "--sessions", "600", "--days", "4", "--seed", "11"])  # fmt: skip
    shutil.copytree(local / "data", cluster / "data")  # the event log and the catalogue
    inkling(local, "local[2]", *JOBS)
    with StandaloneCluster(root / "daemons", workers=2, cores=1, memory="1g") as spark:
        inkling(cluster, spark.master_url, *JOBS)
        state = spark.state()
        applications = [*state["activeapps"], *state["completedapps"]]  # type: ignore[misc]
    assert len(applications) == 1, applications  # the jobs ran there, not locally
    return {"local": local / "data", "cluster": cluster / "data"}


@pytest.mark.parametrize(
    "output",
    [
        "features/item_features",
        "features/user_features",
        "features/session_features",
        "features/covisitation",
        "training",
    ],
)
def test_the_cluster_writes_the_same_rows_as_local(runs, output):
    local, cluster = table(runs["local"] / output), table(runs["cluster"] / output)
    assert len(local) > 0
    pd.testing.assert_frame_equal(local, cluster, check_exact=False, rtol=1e-9)


def test_the_cluster_trains_the_same_als_vectors(runs):
    local = load_embeddings(runs["local"] / "models" / "als")
    cluster = load_embeddings(runs["cluster"] / "models" / "als")
    assert list(local.user_ids) == list(cluster.user_ids)
    assert list(local.item_ids) == list(cluster.item_ids)
    np.testing.assert_allclose(local.item_vectors, cluster.item_vectors, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(local.user_vectors, cluster.user_vectors, rtol=1e-4, atol=1e-5)
