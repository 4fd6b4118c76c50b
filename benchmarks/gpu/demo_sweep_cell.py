"""One demo-protocol training with changed options: python sweep_cell.py OUT NAME METHOD SEED STEPS [accel] [opt=value ...]"""
import json, sys, logging
from pathlib import Path
from semidiff.config import config_from_dict
from semidiff.demo import demo_config, DEMO_CLASS_NAMES
from semidiff.engine.train import train

out, name, method, seed, steps, accel = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
d = demo_config(out, method, steps, seed)
d["experiment"]["name"] = name
d["train"]["accelerator"] = accel
for kv in sys.argv[7:]:
    k, v = kv.split("=")
    d["method"]["options"][k] = float(v) if v.replace(".", "").isdigit() else v
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
cfg = config_from_dict(d, "demo")
r = train(cfg, overwrite=True, log=lambda *_: None)["last"]["summary"]
t = json.loads((cfg.run_dir() / "timing.json").read_text())
print("RESULT " + json.dumps({"name": name, "method": method, "seed": seed, "steps": steps, "opts": sys.argv[7:],
      "dice": r["mean"]["dice"], "per_class": {c: r["per_class"][c]["dice"]["mean"] for c in DEMO_CLASS_NAMES[1:]},
      "wall": t["wall_seconds"]}), flush=True)
