"""Pack ACDC compactly for a GPU machine that gets only the working tree (64 MiB) and no ../shared.

    python benchmarks/gpu/pack_acdc.py $SEMIDIFF_REALDATA/ACDC .gpudata/pack

Training slices are resized to 128x128 with the pipeline's own resize (image bilinear, label
nearest) and quantised to 8 bits (one npz, ~15 MB); validation volumes and lists are copied as
they are (~13 MB). `unpack_acdc.py` rebuilds the SSL4MIS layout from it on the device. Runs on
this copy are exploratory: at a 128x128 training size the on-the-fly resize becomes the identity,
so rotation happens after resizing instead of before, and intensities carry 8 bits.
"""

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np

from semidiff.data.transforms import resize_to

src, out = Path(sys.argv[1]), Path(sys.argv[2])
(out / "ACDC" / "data").mkdir(parents=True, exist_ok=True)
arrays = {}
for p in sorted((src / "data" / "slices").glob("*.h5")):
    with h5py.File(p) as f:
        image, label = f["image"][()], f["label"][()]
    image = np.asarray(resize_to(image, (128, 128), is_label=False))
    arrays["i/" + p.stem] = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    arrays["l/" + p.stem] = np.asarray(resize_to(label, (128, 128), is_label=True)).astype(np.uint8)
np.savez_compressed(out / "slices128_u8.npz", **arrays)
for name in ("train_slices.list", "val.list"):
    shutil.copy(src / name, out / "ACDC" / name)
for p in (src / "data").glob("*.h5"):
    shutil.copy(p, out / "ACDC" / "data" / p.name)
