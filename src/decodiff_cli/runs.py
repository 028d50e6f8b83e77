"""Batch jobs over many images, on a loaded Detector: score, localize, export masks.

Each job processes every input it can, reports the ones it cannot (never stops on one
bad file) and returns a summary; files are written atomically, never over an input, and
never outside the output folder (see output_paths.OutputPaths).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from decodiff_cli.detector import Detector, Prediction
from decodiff_cli.inputs import InputImage
from decodiff_cli.model import InferenceOptions
from decodiff_cli.gallery import GalleryEntry, write_gallery
from decodiff_cli.output_paths import OutputPaths
from decodiff_cli.records import Record
from decodiff_cli.render import binary_mask, heatmap_image, overlay_image, save_float_tiff, save_image


@dataclass
class RunSummary:
    processed: int = 0
    anomalous: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    outputs: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    gallery: list[GalleryEntry] = field(default_factory=list)  # localize's rows, in input order


def merge(summaries: Iterable[RunSummary]) -> RunSummary:
    """One summary from the processes' summaries (given in input order) of a split job."""
    total = RunSummary()
    for part in summaries:
        total.processed += part.processed
        total.anomalous += part.anomalous
        total.failed += part.failed
        total.outputs = total.outputs or part.outputs
        total.gallery += part.gallery
        for key, value in part.timings.items():
            total.timings[key] = total.timings.get(key, 0.0) + value
    return total


def _predictions(detector: Detector, images: list[InputImage], opts: InferenceOptions, keep_corrected: bool = False):
    paths = [str(image.path) for image in images]
    return zip(images, detector.predict(paths, opts, keep_corrected=keep_corrected))


def _tally(summary: RunSummary, pred: Prediction) -> None:
    if pred.error is not None:
        summary.failed.append((pred.path or "?", pred.error))
        return
    summary.processed += 1
    summary.anomalous += int(pred.is_anomalous)
    for key, value in pred.timings.items():
        summary.timings[key] = summary.timings.get(key, 0.0) + value


def to_record(pred: Prediction) -> Record:
    if pred.error is not None:
        return Record(path=pred.path, error=pred.error)
    return Record(path=pred.path, cls=pred.category, score=pred.score, threshold=pred.threshold,
                  normalized_score=pred.normalized_score, is_anomalous=pred.is_anomalous)


def score(detector: Detector, images: list[InputImage], opts: InferenceOptions,
          emit: Callable[[Record], None], advance: Callable[[], None] = lambda: None) -> RunSummary:
    summary = RunSummary()
    for _, pred in _predictions(detector, images, opts):
        _tally(summary, pred)
        emit(to_record(pred))
        advance()
    return summary


def localize(detector: Detector, images: list[InputImage], opts: InferenceOptions, out_dir: Path,
             advance: Callable[[], None] = lambda: None, *, all_inputs: list[InputImage] | None = None,
             write_index: bool = True) -> RunSummary:
    """Heatmap, overlay, input and corrected image and raw float TIFF per image, plus index.html.

    A process of a split job passes every input as ``all_inputs`` (output names depend on
    the whole set) and ``write_index=False``: the main process writes the gallery from
    every process's ``summary.gallery`` once they have all finished."""
    summary = RunSummary(outputs=out_dir)
    paths = OutputPaths(out_dir, images if all_inputs is None else all_inputs)
    entries = summary.gallery
    for image, pred in _predictions(detector, images, opts, keep_corrected=True):
        _tally(summary, pred)
        name = str(image.relative)
        if pred.error is not None:
            entries.append(GalleryEntry(name=name, error=pred.error))
        else:
            target = paths[image.path]
            save_float_tiff(target.anomaly_map, pred.anomaly_map)  # raw values, for evaluation
            shown = display_map(pred.anomaly_map, pred.pixel_threshold)
            save_image(target.heatmap, heatmap_image(shown))
            save_image(target.overlay, overlay_image(pred.original, shown))
            save_image(target.reconstruction, pred.corrected)
            save_image(target.input, pred.original)
            entries.append(GalleryEntry(name=name, score=pred.score, threshold=pred.threshold,
                                        is_anomalous=pred.is_anomalous, heatmap=target.heatmap,
                                        overlay=target.overlay, reconstruction=target.reconstruction,
                                        input=target.input))
        advance()
    if write_index:
        write_gallery(out_dir, entries)
    return summary


def display_map(amap, pixel_threshold: float):
    """Colour scale for people: the pixel threshold sits mid-scale, so what the masks
    would flag is clearly bright and normal texture stays dark, whatever the map's range."""
    if not pixel_threshold > 0:
        return amap
    return (amap / (2 * pixel_threshold)).clip(0, 1)


def export_masks(detector: Detector, images: list[InputImage], opts: InferenceOptions, out_dir: Path,
                 min_area: int = 0, advance: Callable[[], None] = lambda: None, *,
                 all_inputs: list[InputImage] | None = None) -> RunSummary:
    """Binary PNG masks (0/255) at the original resolution, from the pixel threshold.
    ``all_inputs``: every input of a split job (see localize)."""
    summary = RunSummary(outputs=out_dir)
    paths = OutputPaths(out_dir, images if all_inputs is None else all_inputs)
    for image, pred in _predictions(detector, images, opts):
        _tally(summary, pred)
        if pred.error is None:
            save_image(paths[image.path].mask, binary_mask(pred.anomaly_map, pred.pixel_threshold, min_area))
        advance()
    return summary


def existing_outputs(out_dir: Path) -> bool:
    return out_dir.is_dir() and any(out_dir.iterdir())


def skip_already_scored(images: Iterable[InputImage], done: set[str]) -> list[InputImage]:
    return [image for image in images if str(image.path) not in done]
