"""`decodiff benchmark`: the paper's seven metrics for a bundle or for any method's maps."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from decodiff_cli import console
from decodiff_cli.cli.common import DEVICE_OPT, DTYPE_OPT, STEPS_OPT, Dtype, friendly_errors, load_detector
from decodiff_cli.console import EXIT_OK

BENCHMARK_EPILOG = ("Examples:\n\n"
                    "  decodiff benchmark ../shared/data/mvtec_bottle --bundle model --json results.json\n\n"
                    "  decodiff benchmark mvtec/ --maps my_method_maps/ --markdown table.md --plots curves/\n\n"
                    "  decodiff benchmark mvtec/ --bundle model --per-defect\n\n"
                    "  decodiff benchmark mvtec/ --maps review/ --protocol native  # the TIFFs `localize` wrote\n\n"
                    "Exit codes: 0 ok; 2 usage error (bad dataset, bundle or maps).")


@friendly_errors
def benchmark(
    dataset: Path = typer.Argument(..., help="MVTec AD style root, one category folder, or a VisA root (split_csv/1cls.csv).", show_default=False),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Score the test split with this model."),
    maps: Optional[Path] = typer.Option(None, "--maps", help="Read precomputed maps: DIR/<category>/test/<defect>/<id>.tiff or .npy."),
    category: Optional[List[str]] = typer.Option(None, "--category", help="Only these categories (repeatable)."),
    protocol: str = typer.Option("paper", "--protocol", help="paper (resize 288, centre crop 256, the paper's tables), full (whole image at 256) or native (each image at its ground truth's own resolution, as MVTec's official evaluation)."),
    infer_class: bool = typer.Option(False, "--infer-class", help="Unified models: do not tell the model the category."),
    per_defect: bool = typer.Option(False, "--per-defect", help="Also measure each defect type (its images beside the normal ones)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write a Markdown table."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write ROC / PR / PRO curves as PNG into this folder."),
    batch_size: int = typer.Option(16, "--batch-size"),
    device: str = DEVICE_OPT,
    dtype: Dtype = DTYPE_OPT,
    steps: Optional[int] = STEPS_OPT,
) -> None:
    """Image AUROC / AP / F1-max and pixel AUROC / AP / F1-max / AUPRO, per category and averaged."""
    from decodiff_cli.benchmark import evaluate
    from decodiff_cli.evaluation import BundlePredictor
    from decodiff_cli.files import atomic_write_text

    if (bundle is None) == (maps is None):
        raise ValueError("give exactly one of --bundle BUNDLE or --maps DIR")
    predictor = None
    if bundle is not None:
        detector = load_detector(bundle, device, dtype, batch_size)
        predictor = BundlePredictor(detector, protocol, steps=steps, infer_class=infer_class)
    with console.progress_bar() as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        result = evaluate(dataset, categories=category or None, protocol=protocol, maps_dir=maps,
                          predict=predictor, progress=progress, per_defect=per_defect)
    if predictor is not None:
        result.speed = predictor.speed()
    console.out.print(result.rich_table(title=f"decodiff benchmark ({protocol} protocol)"))
    for note in result.notes:
        console.warn(note)
    if predictor is not None:
        s = result.speed
        console.info(f"speed: {s['images_per_s']:.2f} images/s on {s['device']} ({s['dtype']}, batch {s['batch_size']}, "
                     f"steps {s['steps']}); s/image: " + ", ".join(f"{k} {v:.4f}" for k, v in s["seconds_per_image"].items()))
    if json_file is not None:
        atomic_write_text(json_file, result.to_json())
    if markdown is not None:
        atomic_write_text(markdown, result.to_markdown())
    if plots is not None:
        written = result.write_plots(plots)
        console.info(f"{len(written)} plot(s) in {console.escape(str(plots))}")
    raise typer.Exit(EXIT_OK)
