# Source on the GPU machine, from the repository root: installs the carried wheels (.whl) and
# the package, and rebuilds ACDC from the carried pack (.gpudata/pack) under /tmp/realdata.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 SEMIDIFF_REALDATA=/tmp/realdata
python3 benchmarks/gpu/unpack_acdc.py .gpudata/pack /tmp/realdata || return 1
