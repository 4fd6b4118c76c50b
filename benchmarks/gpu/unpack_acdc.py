"""Rebuild the SSL4MIS ACDC layout from pack_acdc.py's output (on the GPU machine).

    python benchmarks/gpu/unpack_acdc.py .gpudata/pack /tmp/realdata
"""

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np

pack, out = Path(sys.argv[1]), Path(sys.argv[2]) / "ACDC"
shutil.copytree(pack / "ACDC", out, dirs_exist_ok=True)
(out / "data" / "slices").mkdir(parents=True, exist_ok=True)
arrays = np.load(pack / "slices128_u8.npz")
for key in arrays.files:
    if key.startswith("i/"):
        case = key[2:]
        with h5py.File(out / "data" / "slices" / f"{case}.h5", "w") as f:
            f["image"] = arrays[key].astype(np.float32) / 255
            f["label"] = arrays["l/" + case]
print(f"{out}: {sum(k.startswith('i/') for k in arrays.files)} slices")
