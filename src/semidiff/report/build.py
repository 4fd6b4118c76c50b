"""``semidiff report``: every table and figure of a bench folder, rebuilt from its finished runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from semidiff.bench.spec import BenchSpec, load_bench
from semidiff.errors import ConfigError
from semidiff.report.collect import (
    aggregate,
    collect,
    is_extra_evaluation,
    is_variant,
    run_count,
    uses_unlabeled,
)
from semidiff.report.figures import (
    plot_curves,
    plot_dice_vs,
    plot_dice_vs_noise,
    plot_per_class,
    plot_qualitative,
    plot_variants,
    row_colours,
)
from semidiff.report.tables import labeled_cell, protocol_lines, write_tables


def write_report(target: str | Path, log: Callable[[str], None] = print) -> Path:
    """Rebuild tables and figures of a bench folder from its finished runs; returns ``table.md``."""
    bench_dir = Path(target)
    results = collect(bench_dir)
    if not results:
        raise ConfigError(f"{bench_dir}: no finished runs yet (a run is finished once timing.json and "
                          "eval_val_last/ exist)")
    rows = aggregate(results)
    # Figures show each run's default output; extra evaluations ("method [name]") are table rows only.
    # Variant rows ("bcp (u_weight=0)") get a figure of their own beside their method's default: in
    # the method figures a dozen single-point variants bury the comparison the figures are for.
    main_rows = [r for r in rows if not is_extra_evaluation(r["method"]) and not is_variant(r["method"])]
    main_results = [r for r in results if not is_extra_evaluation(r.method) and not is_variant(r.method)]
    # "3 patients (first)" -> "labeled patients"; mixed units -> "labeled count". A fraction row
    # (the all-labels reference) names its share itself (``labeled_cell``), so it sets no unit.
    units = {str(r["labeled_text"]).split(" ")[1] for r in main_rows
             if len(str(r["labeled_text"]).split(" ")) > 1
             and not labeled_cell(r["labeled"], r["labeled_text"]).endswith("%")}
    xlabel = f"labeled {units.pop()}" if len(units) == 1 else "labeled count"
    colours = row_colours(r.method for r in main_results)  # one colour per method in every figure
    plot_dice_vs(main_rows, "labeled", bench_dir / "dice_vs_labeled.png", xlabel, colours)
    plot_per_class(main_rows, bench_dir / "per_class.png", colours)
    figures = ["dice_vs_labeled.png", "per_class.png", "curves.png"]
    if len({r["noise"] for r in main_rows}) > 1:
        plot_dice_vs_noise(main_rows, bench_dir / "dice_vs_noise.png", colours,
                           "labeled" if xlabel == "labeled count" else xlabel.removeprefix("labeled "),
                           uses_unlabeled(main_results))
        figures.append("dice_vs_noise.png")
    plot_curves(main_results, bench_dir / "curves.png", colours)
    if plot_variants(rows, bench_dir / "variants.png", colours, uses_unlabeled(results)):
        figures.append("variants.png")
    else:
        (bench_dir / "variants.png").unlink(missing_ok=True)
    if plot_qualitative(main_results, bench_dir / "qualitative.png", max_cases=_qualitative_cases(bench_dir)):
        figures.append("qualitative.png")
    else:
        (bench_dir / "qualitative.png").unlink(missing_ok=True)  # a stale panel would show other runs
    write_tables(rows, protocol_lines(results, bench_dir), bench_dir, figures)
    log(f"report of {run_count(results)} runs: {bench_dir / 'table.md'}")
    return bench_dir / "table.md"


def _qualitative_cases(target: Path) -> int:
    if not (target / "bench.yaml").is_file():
        return BenchSpec.model_fields["qualitative_cases"].default
    spec, _ = load_bench(target / "bench.yaml")
    return spec.qualitative_cases
