#!/usr/bin/env bash
# Brings flash-attn-4 (the `fa4` extra) to a GPU machine that cannot reach a package index, within a 64 MiB
# per-call upload: its CUDA 13 compiler library (an 88 MB wheel, 237 MB unpacked) goes xz-compressed in two halves,
# .fa4a/ and .fa4b/ (the second with the small wheels), both ignored by git. Building it takes ~5 minutes (xz -9).
#
#   bash experiments/fa4_device_bundle.sh
#   # call 1, carrying .fa4a:  mkdir -p /tmp/fa4keep && cp .fa4a/* /tmp/fa4keep/
#   # call 2 (at once, while that machine is still held), carrying .fa4b:
#   #   cat /tmp/fa4keep/cu13.part.aa .fa4b/cu13.part.ab | xz -d -T8 | tar xf - -C /tmp/cu13 &&
#   #   python3 -m pip install -q --no-index --no-deps --target /tmp/site .fa4b/*.whl &&
#   #   cp -r /tmp/cu13/nvidia_cutlass_dsl/* /tmp/site/nvidia_cutlass_dsl/ &&
#   #   export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site:.
#
# (mkdir -p /tmp/site /tmp/cu13 first.) Later calls to the same machine keep /tmp. Versions: those of the decode
# table's run (flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1, Python 3.12, x86-64).
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .fa4a .fa4b; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
tmp=$(mktemp -d)
pip_dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$tmp" "$@"
}
pip_dl flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
  torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
mkdir -p "$tmp/x" && (cd "$tmp/x" && python3 -m zipfile -e "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl .)
tar cf - -C "$tmp/x" . | xz -9 -T0 > "$tmp/cu13.tar.xz"
rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
(cd "$tmp" && split -n 2 cu13.tar.xz cu13.part.)  # two halves, each under the upload with the rest
mv "$tmp/cu13.part.aa" .fa4a/ && mv "$tmp/cu13.part.ab" .fa4b/
find "$tmp" -maxdepth 1 -name '*.whl' ! -name 'nvidia_cutlass_dsl_libs_cu13-*' -exec mv {} .fa4b/ \;
rm -rf "$tmp"
du -sh .fa4a .fa4b
