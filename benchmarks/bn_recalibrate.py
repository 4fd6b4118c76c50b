"""Evaluate a run's checkpoint after re-estimating its BatchNorm running statistics on the labeled
training images only (one image at a time, at the inference geometry, cumulative average).

Why: Diff-CL's CS collects its running statistics over labeled, weak and strong (jittered, blurred,
CutMixed) passes; on EndoScapes its last checkpoint labelled the gallbladder as tool on validation
while its training losses kept falling. If the statistics are the cause, this recovers the network.
A plain supervised run is the control (its statistics already come from labeled images).

    python benchmarks/bn_recalibrate.py RUN_DIR final.ckpt OUT_DIR/eval_val_last
    python benchmarks/empty_frames.py OUT_DIR/..        # strict and present-frame Dice of OUT_DIR's runs
"""
import sys
from pathlib import Path

import torch

from semidiff.engine.data import build_reader, build_splits
from semidiff.engine.module import load_module
from semidiff.evaluation.evaluate import evaluate, predict_image

torch.set_num_threads(2)
run = Path(sys.argv[1]); ckpt = run / "checkpoints" / sys.argv[2]
module = load_module(str(ckpt)); cfg = module.cfg; method = module.method
reader = build_reader(cfg); splits = build_splits(cfg, reader)
output = "cs" if hasattr(method, "cs") else None  # Diff-CL: its CS network; other methods: the whole method
net = getattr(method, "cs", method)
bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
print(len(bns), "BatchNorm layers re-estimated;", len(splits.labeled), "labeled frames")
method.eval()
for m in bns:
    m.reset_running_stats(); m.momentum = None; m.train()
predict = method.predictor(output)
with torch.no_grad():
    for ref in splits.labeled:
        case = reader.load(ref)
        predict_image(predict, cfg, case.image, torch.device("cpu"))
res = evaluate(method, cfg, reader, splits.val, Path(sys.argv[3]), split="val",
               checkpoint=f"{ckpt.stem}, BN statistics re-estimated on the labeled frames", device=torch.device("cpu"),
               output=output, log=lambda *_: None)
print("mean dice", res["summary"]["mean"]["dice"])
