# Source on the GPU machine, from the repository root: installs the carried wheels (.whl) and
# the package, and rebuilds ACDC from the carried pack (.gpudata/pack) under /tmp/realdata.
# Made beforehand on the development machine (both folders listed in .git/info/exclude, and named
# in the device call's `carry`):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     monai==1.6.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     mambapy==1.2.0 typing_extensions==4.16.0
#   python benchmarks/gpu/pack_acdc.py $SEMIDIFF_REALDATA/ACDC .gpudata/pack
# Then: bash benchmarks/gpu/acdc_grid.sh (real trainings, then step_times.sh)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 SEMIDIFF_REALDATA=/tmp/realdata
python3 benchmarks/gpu/unpack_acdc.py .gpudata/pack /tmp/realdata || return 1
