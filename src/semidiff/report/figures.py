"""The report's figures: Dice against labeled count and noise, per-class Dice, variants, training
curves and the qualitative panel; one colour (and marker or hatch) per row across all of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semidiff.report.collect import (
    CellResult,
    base_method,
    is_variant,
    read_logged_scalars,
    variant_groups,
)
from semidiff.report.tables import format_mean_std, labeled_cell


def row_colours(methods) -> dict[str, str]:
    """One colour per row, the same in every panel and figure of a report.

    Up to 10 rows get matplotlib's default cycle. More (variant rows such as ``bcp (u_weight=0)``)
    get ``tab20``: each method its dark shade, its first variant the light shade of the same hue,
    further rows the unused colours, so up to 20 rows no two share a colour. Past 20 colours repeat;
    the line figures then tell rows apart by marker (``row_markers``), the bar figure by hatch (``row_hatches``).
    """
    names = list(dict.fromkeys(methods))
    if len(names) <= 10:
        return {m: f"C{i}" for i, m in enumerate(names)}
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    tab20 = [to_hex(c) for c in colormaps["tab20"].colors]
    dark, light = tab20[0::2], tab20[1::2]
    hue = {b: i % 10 for i, b in enumerate(dict.fromkeys(base_method(n) for n in names))}
    out: dict[str, str] = {}
    for n in names:  # methods first: their dark shade
        if n == base_method(n):
            out[n] = dark[hue[n]]
    for n in names:  # variants: the light shade of their method's hue, else the first unused colour
        if n not in out:
            wanted = [light[hue[base_method(n)]], dark[hue[base_method(n)]]]
            free = [c for c in wanted + tab20 if c not in out.values()]
            out[n] = free[0] if free else tab20[len(out) % 20]
    return {n: out[n] for n in names}


def _colour_rank(colours: dict[str, str]) -> dict[str, int]:
    """How many earlier rows share each row's colour (0 for the first): the key of its second style."""
    seen: dict[str, int] = {}
    rank = {}
    for name, colour in colours.items():
        rank[name] = seen.get(colour, 0)
        seen[colour] = rank[name] + 1
    return rank


def row_markers(colours: dict[str, str]) -> dict[str, str]:
    """A marker per row: the n-th row drawn in a colour gets the n-th shape, so no two rows look alike."""
    shapes = ["o", "s", "^", "D", "v", "P", "X", "*"]
    return {name: shapes[n % len(shapes)] for name, n in _colour_rank(colours).items()}


def row_hatches(colours: dict[str, str]) -> dict[str, str]:
    """The bar-figure twin of ``row_markers``: the n-th row in a colour gets the n-th hatch (none first)."""
    patterns = ["", "//", "..", "xx", "\\\\", "++", "oo", "**"]
    return {name: patterns[n % len(patterns)] for name, n in _colour_rank(colours).items()}


def _seeds_text(rows: list[dict]) -> str:
    counts = sorted({len(r["seeds"]) for r in rows})
    if counts == [1]:
        return "one seed, no error bars"
    return f"error bars: std over {'/'.join(map(str, counts))} seeds"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _sideways(i: int, n: int, step: float) -> float:
    """The x offset of the i-th of n curves that share x values, centred on them, ``step`` apart."""
    return (i - (n - 1) / 2) * step


def plot_dice_vs(rows: list[dict], axis: str, out_file: Path, xlabel: str,
                 colours: dict[str, str] | None = None) -> None:
    """Mean Dice (last checkpoint, error bar = std over seeds) against labeled count or noise level."""
    rows = [r for r in rows if r["checkpoint"] == "last"]
    # Past a handful of rows an in-axes legend covers points or error bars (seen on the ACDC grid's
    # 8 rows): it goes to the right of the plot.
    legend_outside = len({r["method"] for r in rows}) > 5
    fig = _figure(9 if legend_outside else 6, 4)
    ax = fig.add_subplot()
    # A row trained at a count no other row uses (the all-labels upper bound) is a reference line.
    by_method: dict[str, set] = {}
    for r in rows:
        by_method.setdefault(r["method"], set()).add(r[axis])
    reference = {m for m, xs in by_method.items() if axis == "labeled" and len(xs) == 1
                 and not any(xs & other for o, other in by_method.items() if o != m)}
    for i, method in enumerate(sorted(reference)):
        r = next(r for r in rows if r["method"] == method)
        n = len(r["seeds"])
        ax.axhline(r["dice"][0], color="0.3", ls=["--", ":", "-."][i % 3], lw=1,
                   label=f"{method} ({labeled_cell(r['labeled'], r['labeled_text'])} labeled): "
                         f"{format_mean_std(r['dice'], 3, n)}"
                         + (f" ({n} seeds)" if n > 1 else ""))
    colours = colours or row_colours(r["method"] for r in rows)
    markers = row_markers(colours)
    rows = [r for r in rows if r["method"] not in reference]
    xs_all = list(dict.fromkeys(r[axis] for r in rows))
    if axis == "labeled":
        xs_all = sorted(xs_all)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # Methods at one x are spread sideways, so that their error bars do not hide each other.
    dodge = min(0.04, 0.3 / max(len(methods), 1))
    for j, method in enumerate(methods):
        pts = [(xs_all.index(r[axis]), r["dice"], len(r["seeds"])) for r in rows if r["method"] == method
               and (axis == "noise" or r["noise"] == rows[0]["noise"])]
        if not pts:
            continue
        pts.sort()
        shift = _sideways(j, len(methods), dodge)
        ax.errorbar([p[0] + shift for p in pts], [p[1][0] for p in pts],
                    yerr=[p[1][1] if p[2] > 1 else 0.0 for p in pts],
                    marker=markers[method], capsize=3 if any(p[2] > 1 for p in pts) else 0, color=colours[method],
                    label=method)
    ax.set_xticks(range(len(xs_all)), [f"{x:g}" if isinstance(x, float) else str(x) for x in xs_all])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean Dice (validation, last checkpoint)")
    ax.set_title(_seeds_text(rows), fontsize=8)
    ax.grid(alpha=0.3)
    if legend_outside:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    else:
        ax.legend(fontsize=8)
    fig.savefig(out_file)


def _noise_kind_amount(label: str) -> tuple[str, str, float]:
    """``pseudo-flip-0.1`` -> ("pseudo", "flip", 0.1); ``labeled-erode-k2`` -> ("labeled", "erode", 2)."""
    target, kind, amount = label.split("-", 2)
    return target, kind, float(amount.lstrip("k"))


def noise_panels(rows: list[dict], unlabeled: dict[str, bool] | None = None,
                 ) -> dict[tuple[float, str, str], dict[str, list[tuple[float, tuple]]]]:
    """Points of the Dice-against-noise figure: panel (labeled, target, kind) -> method -> [(amount, dice)].

    Only labeled counts with at least one noisy run get panels (a folder of runs may hold others).
    The clean run of the same method and labeled count is the point at amount 0 of every panel; a
    method with only a clean run there is kept only if it has no pseudo-labels to corrupt
    (supervised, in a pseudo-label panel; ``unlabeled`` maps row names to
    :func:`~semidiff.report.collect.uses_unlabeled`): a single point at 0, drawn as a reference line.
    """
    rows = [r for r in rows if r["checkpoint"] == "last"]
    # (target, kind, amount) of every row; a clean run is amount 0 of every kind.
    level = {r["noise"]: _noise_kind_amount(r["noise"]) for r in rows if r["noise"] != "clean"}
    panels: dict[tuple[float, str, str], dict[str, list[tuple[float, tuple]]]] = {}
    for r in sorted(rows, key=lambda r: (r["labeled"], r["noise"])):
        if r["noise"] in level:
            panels.setdefault((r["labeled"], *level[r["noise"]][:2]), {})
    for (labeled, target, kind), methods in panels.items():
        for r in rows:
            if r["labeled"] != labeled:
                continue
            if r["noise"] == "clean" or level[r["noise"]][:2] == (target, kind):
                amount = 0.0 if r["noise"] == "clean" else level[r["noise"]][2]
                methods.setdefault(r["method"], []).append((amount, r["dice"], len(r["seeds"])))
        for method, pts in list(methods.items()):
            pts.sort(key=lambda p: p[0])
            if len(pts) == 1 and not (target == "pseudo" and not (unlabeled or {}).get(method, True)):
                del methods[method]  # a clean run whose noisy runs are missing is no reference
    return panels


def plot_dice_vs_noise(rows: list[dict], out_file: Path, colours: dict[str, str] | None = None,
                       unit: str = "labeled", unlabeled: dict[str, bool] | None = None) -> None:
    """Mean Dice (last checkpoint) against noise amount, one panel per labeled count and noise kind.

    Error bars (std over seeds) only where a point has more than one seed.
    """
    panels = noise_panels(rows, unlabeled)
    colours = colours or row_colours(r["method"] for r in rows)
    markers = row_markers(colours)
    fig = _figure(4.2 * max(1, len(panels)), 3.8)
    for i, ((labeled, target, kind), methods) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        lines = [m for m, pts in methods.items() if len(pts) > 1 or pts[0][0] != 0.0]
        # Curves are spread sideways by a sliver of the amount axis, so their error bars do not hide
        # each other at a shared amount.
        dodge = 0.015 * (max(p[0] for pts in methods.values() for p in pts) or 1.0)
        for method, pts in methods.items():
            if method not in lines:
                ax.axhline(pts[0][1][0], color=colours.get(method, "0.3"), ls="--", lw=1,
                           label=f"{method} (no pseudo-labels)")
                continue
            seeded = any(p[2] > 1 for p in pts)
            shift = _sideways(lines.index(method), len(lines), dodge)
            ax.errorbar([p[0] + shift for p in pts], [p[1][0] for p in pts],
                        yerr=[p[1][1] if p[2] > 1 else 0.0 for p in pts] if seeded else None,
                        marker=markers.get(method, "o"), capsize=3 if seeded else 0, color=colours.get(method, "0.3"),
                        label=method)
        amount = "k (pixels)" if kind in ("erode", "dilate") else "rate"
        ax.set(xlabel=f"{kind} {amount} (0 = clean run)", ylabel="mean Dice (validation, last)",
               title=f"{labeled:g} {unit}, {target} labels: {kind}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    # The seed count of the curves (reference lines carry no error bar).
    curves = {(m, labeled) for (labeled, _, _), methods in panels.items() for m, pts in methods.items() if len(pts) > 1}
    fig.suptitle(_seeds_text([r for r in rows if r["checkpoint"] == "last" and (r["method"], r["labeled"]) in curves]
                             or rows), fontsize=8)
    fig.savefig(out_file)


def per_class_metric(rows: list[dict]) -> str:
    """``pooled_dice`` when every row has it, else ``dice`` (rows from runs evaluated before the counts)."""
    return "pooled_dice" if all(np.isfinite(r["pooled_dice"][0]) for r in rows) else "dice"


def plot_per_class(rows: list[dict], out_file: Path, colours: dict[str, str] | None = None) -> None:
    """Per-class Dice bars, one panel per labeled count, one bar group per class: the pooled Dice
    when every run has it (no empty rule to reward silence), else the per-case mean."""
    from matplotlib.patches import Patch

    rows = [r for r in rows if r["checkpoint"] == "last" and r["noise"] == rows[0]["noise"]]
    metric = per_class_metric(rows)
    counts = sorted({r["labeled"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = colours or row_colours(methods)
    hatches = row_hatches(colours)
    classes = rows[0]["class_names"]
    fig = _figure(4.5 * len(counts) + 1.8, 3.8)
    for i, n in enumerate(counts):
        ax = fig.add_subplot(1, len(counts), i + 1)
        present = [m for m in methods if any(r["method"] == m and r["labeled"] == n for r in rows)]
        width = 0.8 / max(1, len(present))
        for j, method in enumerate(present):  # a method missing at this count leaves no gap
            r = next(r for r in rows if r["method"] == method and r["labeled"] == n)
            spread = len(r["seeds"]) > 1
            ax.bar(np.arange(len(classes)) + j * width, [r[f"{metric}/{c}"][0] for c in classes], width,
                   yerr=[r[f"{metric}/{c}"][1] for c in classes] if spread else None, capsize=2,
                   color=colours[method], hatch=hatches[method], label=method)
        ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes)
        ax.set_ylim(0, 1)
        ax.set_title(next(r["labeled_text"] for r in rows if r["labeled"] == n), fontsize=9)
        ax.set_ylabel(f"{'pooled ' if metric == 'pooled_dice' else ''}Dice (validation, last checkpoint)")
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(facecolor=c, hatch=hatches[m], label=m) for m, c in colours.items() if m in methods]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, title=_seeds_text(rows), title_fontsize=7)
    fig.savefig(out_file)


def labels_only_row(rows: list[dict], labeled: float, noise: str, unlabeled: dict[str, bool],
                    exclude: set[str] | frozenset[str] = frozenset()) -> dict | None:
    """The last-checkpoint row of a method that learns from labels alone (``unlabeled`` maps row names
    to :func:`~semidiff.report.collect.uses_unlabeled`), at this labeled count and noise, not a variant and not in ``exclude``."""
    return next((r for r in rows if (r["labeled"], r["noise"], r["checkpoint"]) == (labeled, noise, "last")
                 and unlabeled.get(r["method"]) is False and not is_variant(r["method"])
                 and base_method(r["method"]) not in exclude), None)


def plot_variants(rows: list[dict], out_file: Path, colours: dict[str, str] | None = None,
                  unlabeled: dict[str, bool] | None = None) -> bool:
    """Each variant row's mean Dice beside its method's default, one panel per (labeled, noise) cell.

    A dot per row (error bar = std over seeds where there are several), the row's name on the axis,
    its value beside it, and the default's value as a dashed line through its method's rows; a
    labels-only run of the same cell (``unlabeled``: see :func:`labels_only_row`), when there is
    one, as a dotted line across the panel. Returns False (and draws nothing) without variant rows.
    """
    groups = variant_groups(rows)
    if not groups:
        return False
    colours = colours or row_colours(base_method(r["method"]) for g in groups.values() for r in g)
    heights = [len(g) for g in groups.values()]
    fig = _figure(8.5, 0.8 + 0.27 * sum(heights) + 0.5 * len(groups))
    axes = fig.subplots(len(groups), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, ((labeled, noise), group) in zip(axes, groups.items()):
        ys = np.arange(len(group))[::-1]
        for y, r in zip(ys, group):
            n = len(r["seeds"])
            colour = colours.get(base_method(r["method"]), "0.3")
            ax.errorbar(r["dice"][0], y, xerr=r["dice"][1] if n > 1 else None, fmt="o" if is_variant(r["method"])
                        else "D", color=colour, capsize=3)
            seeds = f"  ({n} seeds)" if n > 1 else ""
            ax.annotate(f"{r['dice'][0]:.3f}{seeds}", (r["dice"][0], y), xytext=(6, 3), textcoords="offset points",
                        fontsize=7)
        for b in dict.fromkeys(base_method(r["method"]) for r in group):
            mine = [(y, r) for y, r in zip(ys, group) if base_method(r["method"]) == b]
            default = next((r for _, r in mine if not is_variant(r["method"])), None)
            if default is not None:
                ax.vlines(default["dice"][0], min(y for y, _ in mine) - 0.4, max(y for y, _ in mine) + 0.4,
                          colors=colours.get(b, "0.3"), linestyles="--", lw=1)
        # Labels alone, same count and noise: the bar every semi-supervised row has to clear.
        sup = labels_only_row(rows, labeled, noise, unlabeled or {}, {base_method(r["method"]) for r in group})
        if sup is not None:
            ax.axvline(sup["dice"][0], color="0.4", ls=":", lw=1.2,
                       label=f"{sup['method']}, same labels: {sup['dice'][0]:.3f}")
            ax.legend(fontsize=7, loc="lower left")
        ax.set_yticks(ys, [r["method"] + ("  [default]" if not is_variant(r["method"]) else "") for r in group],
                      fontsize=7)
        ax.set_ylim(-0.6, len(group) - 0.4)
        right = max([r["dice"][0] + r["dice"][1] for r in group] + ([sup["dice"][0]] if sup else []))
        ax.set_xlim(right=right + 0.08)  # room for the values written beside the dots
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{group[0]['labeled_text']}, {noise}: variants against their method's default (dashed)",
                     fontsize=8)
    axes[-1].set_xlabel("mean Dice (validation, last checkpoint)")
    fig.savefig(out_file)
    return True


def curve_runs(results: list[CellResult]) -> list[CellResult]:
    """The runs the training-curve figure draws: the clean ones when there are any, since colour
    (method) and line style (labeled count) leave no key for the noise level."""
    return [r for r in results if r.noise == "clean"] or results


def plot_curves(results: list[CellResult], out_file: Path, colours: dict[str, str] | None = None) -> None:
    """Training loss and validation Dice against step for every run (colour = method)."""
    from matplotlib.lines import Line2D

    fig = _figure(12.5, 4)
    ax_loss, ax_dice = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    drawn = curve_runs(results)
    if len(drawn) < len(results):
        fig.suptitle("clean runs only (the noisy runs are in dice_vs_noise.png)", fontsize=8)
    results = drawn
    colours = colours or row_colours(r.method for r in results)
    markers = row_markers(colours)  # before dropping the undrawn rows: each row keeps its marker of the other figures
    colours = {m: c for m, c in colours.items() if any(r.method == m for r in results)}
    styles = ["-", "--", ":", "-."]
    counts = sorted({r.labeled for r in results})
    for r in results:
        c = read_logged_scalars(r.run_dir, ["train/loss", "val/dice_mean"])
        colour, style = colours[r.method], styles[counts.index(r.labeled) % 4]
        if c["train/loss"]:
            steps, vals = zip(*c["train/loss"])
            ax_loss.plot(steps, vals, style, color=colour, alpha=0.7, lw=0.8)
        if c["val/dice_mean"]:
            steps, vals = zip(*c["val/dice_mean"])
            ax_dice.plot(steps, vals, style, color=colour, marker=markers[r.method], ms=3)
    ax_loss.set(xlabel="step", ylabel="training loss (total, method-specific)", yscale="log", title="training loss")
    ax_dice.set(xlabel="step", ylabel="mean Dice", title="validation Dice")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    # Two keys: colour = method, line style = labeled count.
    handles = [Line2D([], [], color=colour, marker=markers[m], ms=3, label=m) for m, colour in colours.items()]
    # "100% labeled" for the all-labels run, not "1 labeled" (labeled_cell).
    shares = {r.labeled: labeled_cell(r.labeled, r.labeled_text) for r in results}
    handles += [Line2D([], [], color="0.2", ls=styles[i % 4], label=f"{shares.get(n, f'{n:g}')} labeled")
                for i, n in enumerate(counts)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7)
    fig.savefig(out_file)


def plot_qualitative(results: list[CellResult], out_file: Path, max_cases: int) -> bool:
    """Image, truth and each method's prediction on the same validation slices.

    Drawn for the labeled count and seed that the most methods share (fewest labels on a tie).

    Uses the ``overlay_slices.npz`` that evaluation writes; returns False when there is none.
    """
    from matplotlib.patches import Patch

    from semidiff.evaluation.figures import class_colour, overlay_rgb

    if max_cases == 0 or not results:
        return False
    with_slices = [r for r in results if r.noise == results[0].noise
                   and (r.run_dir / "eval_val_last" / "overlay_slices.npz").is_file()]
    # Variant rows (``bcp (u_weight=0)``) are diagnostics: the panel shows each method once.
    with_slices = [r for r in with_slices if r.method == base_method(r.method)] or with_slices
    if not with_slices:
        return False
    # The labeled count and seed where most methods can be compared (fewest labels on a tie).
    n, seed = max(sorted({(r.labeled, r.seed) for r in with_slices}),
                  key=lambda ls: len({r.method for r in with_slices if (r.labeled, r.seed) == ls}))
    chosen = {}
    for r in with_slices:
        if (r.labeled, r.seed) == (n, seed) and r.method not in chosen:
            chosen[r.method] = np.load(r.run_dir / "eval_val_last" / "overlay_slices.npz")
    first = next(iter(chosen.values()))
    cases = [k[len("image/"):] for k in first.files if k.startswith("image/")][:max_cases]
    ncol = 2 + len(chosen)
    # Rows as tall as the frames' aspect asks (a 16:9 endoscopy frame needs half a square panel).
    height, width = first[f"truth/{cases[0]}"].shape[-2:]
    fig = _figure(2.2 * ncol, (2.2 * height / width + 0.3) * len(cases) + 0.9)
    shown = next(r for r in with_slices if (r.labeled, r.seed) == (n, seed))
    fig.suptitle(f"validation slices, {shown.labeled_text}, seed {seed}, last checkpoint", fontsize=9)
    for i, case in enumerate(cases):
        image, truth = first[f"image/{case}"], first[f"truth/{case}"]
        panels = [("image", overlay_rgb(image, None)), ("truth", overlay_rgb(image, truth))]
        panels += [(m, overlay_rgb(image, z[f"pred/{case}"])) for m, z in chosen.items() if f"pred/{case}" in z]
        for j, (title, rgb) in enumerate(panels):
            ax = fig.add_subplot(len(cases), ncol, i * ncol + j + 1)
            ax.imshow(rgb)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(case, fontsize=7)
    # Class colours: the foreground classes are 1.. in the order of the summaries' per-class names.
    names = with_slices[0].class_names
    fig.legend(handles=[Patch(color=np.asarray(class_colour(i + 1)) / 255.0, label=c) for i, c in enumerate(names)],
               loc="outside lower center", ncol=min(len(names), max(2, int(2.2 * ncol / 1.7))), fontsize=8)
    fig.savefig(out_file)
    return True

