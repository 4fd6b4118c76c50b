"""Reader throughput: can data loading keep up with a training step on this CPU?

    OMP_NUM_THREADS=1 python benchmarks/reader_throughput.py [--realdata ../shared/realdata] [--cases 8]

Measures, single process (``data.num_workers: 0``, the reduced budgets' setting):

- cold loading (``reader.load`` + the budget's resampling), in cases per second, for the LA h5
  reader (UA-MT layout, real data), the ACDC slice reader (SSL4MIS layout, real data) and an
  nnU-Net-style NIfTI folder generated in a temporary directory (LA-sized gzip NIfTI volumes);
- the per-step cost once the cases are cached (``data.cache: true``, the default): building one
  batch of items with the training transforms (crop/resize + augmentation), for the reduced
  budgets' batch (2+2 patches in 3D, 4+4 slices for ACDC).

A step costs about 1 s for a V-Net on LA-reduced and 0.3 s for a U-Net on ACDC-reduced on this
machine's 2 cores (``benchmarks/results/supervised_reduced.md``). With ``num_workers: 0`` the batch
time adds to every step (the "added" column); a worker (``data.num_workers: 1``) can overlap it with
the step when it is shorter than the step ("keeps up"). The cold load is paid once per case per
run, since cases stay cached.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from semidiff.data import create_reader, train_transforms
from semidiff.data.transforms import case_to_item, resample_volume


def _cold(reader, refs, factor: float = 1.0) -> tuple[float, list]:
    """Seconds per case to load (and resample) ``refs``; returns the cases too."""
    cases = []
    start = time.perf_counter()
    for ref in refs:
        case = reader.load(ref)
        if factor != 1.0:
            dims = case.image.ndim - 1
            case.image = resample_volume(case.image, factor, is_label=False, spatial_dims=dims)
            case.label = resample_volume(case.label, factor, is_label=True, spatial_dims=dims)
        cases.append(case)
    return (time.perf_counter() - start) / len(refs), cases


def _batch_time(cases, spatial_dims: int, patch: list[int], batch: int, repeats: int = 5) -> float:
    """Seconds to build one batch of ``batch`` augmented items from cached cases."""
    transform = train_transforms(spatial_dims, patch, augment=True)
    transform.set_random_state(seed=0)
    start = time.perf_counter()
    for r in range(repeats):
        for i in range(batch):
            transform(case_to_item(cases[(r * batch + i) % len(cases)]))
    return (time.perf_counter() - start) / repeats


def _make_nifti_folder(root: Path, n: int, shape: tuple[int, int, int]) -> Path:
    """An nnU-Net-style folder of LA-sized volumes (gzip NIfTI, as users keep them)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "LA": 1},
                                                   "file_ending": ".nii.gz"}))
    for i in range(n):
        image = rng.normal(300, 80, size=shape).astype(np.int16)  # scanners store integers
        label = np.zeros(shape, np.uint8)
        label[20:60, 40:100, 50:120] = 1
        for arr, path in ((image, root / "imagesTr" / f"la{i:03d}_0000.nii.gz"), (label, root / "labelsTr" / f"la{i:03d}.nii.gz")):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((0.625, 0.625, 0.625))
            sitk.WriteImage(img, str(path), useCompression=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realdata", default=os.environ.get("SEMIDIFF_REALDATA", "../shared/realdata"))
    parser.add_argument("--cases", type=int, default=8, help="3D cases per measurement")
    args = parser.parse_args()
    real = Path(args.realdata)
    rows = []

    la = create_reader("la", real / "LA")
    refs = la.cases("train")[: args.cases]
    per_case, cases = _cold(la, refs)
    per_case_half, half = _cold(la, refs, factor=0.5)
    rows.append(("LA h5 (UA-MT), full resolution", 1 / per_case, _batch_time(cases, 3, [112, 112, 80], 4), 1.0))
    rows.append(("LA h5 (UA-MT), resampled x0.5 (LA-reduced)", 1 / per_case_half,
                 _batch_time(half, 3, [56, 56, 40], 4), 1.0))

    acdc = create_reader("acdc", real / "ACDC")
    slice_refs = acdc.cases("train")[:200]
    per_slice, slices = _cold(acdc, slice_refs)
    rows.append(("ACDC h5 slices (SSL4MIS)", 1 / per_slice, _batch_time(slices, 2, [128, 128], 8), 0.3))

    with tempfile.TemporaryDirectory() as tmp:
        folder = _make_nifti_folder(Path(tmp) / "own", args.cases, (88, 144, 176))
        own = create_reader("nnunet", folder, val_fraction=0.0)
        per_vol, vols = _cold(own, own.cases("train"))
        per_vol_half, vols_half = _cold(own, own.cases("train"), factor=0.5)
        rows.append(("nnU-Net NIfTI.gz folder, LA-sized", 1 / per_vol, _batch_time(vols, 3, [112, 112, 80], 4), 1.0))
        rows.append(("nnU-Net NIfTI.gz folder, resampled x0.5", 1 / per_vol_half,
                     _batch_time(vols_half, 3, [56, 56, 40], 4), 1.0))

    print(f"machine: {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          "single process (num_workers 0)")
    print("batch = the reduced budgets' 2+2 (3D) or 4+4 (ACDC) items; step = the clean training-step cost")
    print("| data | cold load, cases/s | batch from cache (s) | train step (s) | added to a step (num_workers 0) | keeps up |")
    print("|---|---|---|---|---|---|")
    for name, cps, batch_s, step_s in rows:
        print(f"| {name} | {cps:.1f} | {batch_s:.3f} | {step_s:.1f} | {100 * batch_s / step_s:.0f}% | "
              f"{'yes' if batch_s < step_s else 'no'} |")


if __name__ == "__main__":
    main()
