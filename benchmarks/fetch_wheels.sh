#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that the device machine (Python 3.12, x86-64,
# no network) lacks for gram-jax: grain, tensorflow-datasets, ml-collections, tensorboardX and
# their missing requirements. They land in benchmarks/wheels/ (git-ignored, ~11 MB), which the
# device call carries (benchmarks/README.md, "On an accelerator"). Versions are the ones the
# project's CPU environment runs; each is fetched for CPython 3.12 without its dependencies.
set -euo pipefail
cd "$(dirname "$0")"
dest=wheels
mkdir -p "$dest"
py=${PYTHON:-python3}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# Compiled for cp312 (grain, array-record, dm-tree) or pure Python.
wheels=(
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 dm-tree==0.1.10
  tensorflow-datasets==4.9.10 immutabledict==4.3.1 simple-parsing==0.1.9
  docstring-parser==0.18.0 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
  termcolor==3.3.0 toml==0.10.2 ml-collections==1.1.0 tensorboardx==2.6.5
)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dest" "${wheels[@]}"
# promise (a tensorflow-datasets requirement) is published as a source archive only: build
# its pure-Python wheel here.
if ! ls "$dest"/promise-2.3-*.whl >/dev/null 2>&1; then
  "$py" -m pip wheel -q --no-deps -w "$dest" promise==2.3
fi
ls -l "$dest"
du -sh "$dest"
