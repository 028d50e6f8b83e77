"""Plug ``Detector`` into Ray Data or Spark: load the bundle once per worker, score batches.

``ScoreBatch`` is the whole integration: a callable that takes a batch of paths (a column
``path``) and returns the same batch with the scores added. The engine does the rest
(splitting, scheduling, retries, writing). Neither engine is needed to import this file.

Ray Data (one actor per GPU, each loading the bundle once):

    import ray
    ds = ray.data.read_text("paths.txt").rename_columns({"text": "path"})
    scored = ds.map_batches(ScoreBatch, fn_constructor_args=("model/",), batch_size=64,
                            concurrency=4, num_gpus=1)  # num_gpus=0 on CPU workers
    scored.write_parquet("scores/")

Spark (one Detector per partition; mapInPandas hands over pandas batches):

    df = spark.read.text("paths.txt").withColumnRenamed("value", "path")
    schema = "path string, class string, score double, is_anomalous boolean, error string"
    df.repartition(8).mapInPandas(spark_partition("model/"), schema).write.parquet("scores/")

The bundle folder must be readable on every worker (a shared file system, or copied there).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

from decodiff_cli import Detector

COLUMNS = ("path", "class", "score", "is_anomalous", "error")


class ScoreBatch:
    """``{"path": [...]} -> {"path", "class", "score", "is_anomalous", "error"}`` (columns)."""

    def __init__(self, bundle: str, device: str = "auto", batch_size: int = 8) -> None:
        self.detector = Detector.load(bundle, device=device, batch_size=batch_size)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in COLUMNS}
        for p in self.detector.predict([str(path) for path in batch["path"]]):
            out["path"].append(p.path)
            out["class"].append(p.category)
            out["score"].append(p.score if math.isfinite(p.score) else None)
            out["is_anomalous"].append(None if p.error else p.is_anomalous)
            out["error"].append(p.error)
        return out


def spark_partition(bundle: str, device: str = "auto") -> Callable[[Iterator[Any]], Iterator[Any]]:
    """A function for Spark's ``DataFrame.mapInPandas``: one Detector per partition."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        score = ScoreBatch(bundle, device)
        for frame in batches:
            yield pd.DataFrame(score({"path": frame["path"].tolist()}), columns=list(COLUMNS))

    return run
