"""Which normalisation the stored LA and ACDC h5 carry, measured from the files themselves.

    OMP_NUM_THREADS=1 python benchmarks/stored_normalisation.py [--realdata ../shared/realdata] [--la-cases 3]

LA (UA-MT h5): a stored image takes few distinct, equally spaced values, so it is an affine map
``z = (raw - mu) / sigma`` of the scanner's integer intensities. The spacing is ``1 / sigma``, and
``mu`` follows from the smallest value, taken as the scan's minimum (its black background). The
crop's own mean and std, in those units, show whether ``mu``/``sigma`` are the crop's statistics or
the whole scan's. Then ``semidiff predict``'s raw-scan path (the LA config's recorded preprocessing)
is applied to the integer crop alone, and to it with the recovered statistics.

ACDC (SSL4MIS h5): every volume's range, and whether the slices of a training volume share its
scale (min-max per volume) or each span [0, 1] (per slice).

Results: ``benchmarks/results/predict_preprocessing.md``.
"""

from __future__ import annotations

import argparse
import collections
import os
from pathlib import Path

import h5py
import numpy as np

from semidiff.config import load_config
from semidiff.data.preprocessing import preprocessing_from_config

CONFIG = Path(__file__).parents[1] / "configs" / "la" / "supervised_reduced.yaml"


def la(root: Path, n_cases: int) -> None:
    prep = preprocessing_from_config(load_config(CONFIG, [f"data.root={root}"]), strict=True)
    print(f"{CONFIG.name}: {prep.describe()}")
    print("| case | stored mean | stored std | distinct values | integer-grid error (steps) | whole-scan sigma "
          "| raw path on the crop alone: mean / std | raw path with the scan's statistics vs stored |")
    print("|---|---|---|---|---|---|---|---|")
    for case in (root / "val.list").read_text().split()[:n_cases]:
        z = np.asarray(h5py.File(root / "2018LA_Seg_Training Set" / case / "mri_norm2.h5")["image"], dtype=np.float64)
        values = np.unique(z)
        step = float(np.diff(values).min())
        steps = (z - values[0]) / step
        raw = np.round(steps)  # the integer crop, offset so that its minimum is 0
        sigma, mu = 1.0 / step, -values[0] / step
        alone = prep.intensity(raw[None].astype(np.float32), raw=True)[0]
        print(f"| {case} | {z.mean():.4f} | {z.std():.4f} | {values.size} | {np.abs(steps - raw).max():.1e} "
              f"| {sigma:.2f} | {alone.mean():.4f} / {alone.std():.4f} | {np.abs((raw - mu) / sigma - z).max():.1e} |")


def acdc(root: Path) -> None:
    ranges = [(float(a.min()), float(a.max())) for a in
              (np.asarray(h5py.File(p)["image"]) for p in sorted((root / "data").glob("*.h5")))]
    print(f"ACDC: {len(ranges)} stored volumes, minima {sorted({r[0] for r in ranges})}, "
          f"maxima {sorted({r[1] for r in ranges})}")
    volumes = collections.defaultdict(list)
    for p in sorted((root / "data" / "slices").glob("*.h5")):
        volumes[p.stem.split("_slice_")[0]].append(np.asarray(h5py.File(p)["image"]))
    spans = {(min(float(s.min()) for s in v), max(float(s.max()) for s in v)) for v in volumes.values()}
    below = sum(float(s.max()) < 1.0 for v in volumes.values() for s in v)
    print(f"ACDC: {len(volumes)} training volumes as {sum(map(len, volumes.values()))} slices; every volume's "
          f"slices span {sorted(spans)}; slices whose own maximum is below 1: {below}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realdata", default=os.environ.get("SEMIDIFF_REALDATA", "../shared/realdata"))
    parser.add_argument("--la-cases", type=int, default=3)
    args = parser.parse_args()
    la(Path(args.realdata) / "LA", args.la_cases)
    acdc(Path(args.realdata) / "ACDC")


if __name__ == "__main__":
    main()
