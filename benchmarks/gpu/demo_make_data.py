import sys
from pathlib import Path
from semidiff.demo import DEMO_LABELED, DEMO_UNLABELED, DEMO_VAL, DEMO_SIZE
from semidiff.data.demo_data import make_demo_dataset
print(make_demo_dataset(Path(sys.argv[1]) / "data", labeled=DEMO_LABELED, unlabeled=DEMO_UNLABELED, val=DEMO_VAL, size=DEMO_SIZE, seed=0))
