#!/usr/bin/env bash
# Prepare what a GPU session carries to the lent machine. Run HERE, on the CPU machine, in the repository root:
#
#   bash benchmarks/device/prepare.sh
#
# * .whl/               the wheels the GPU image lacks (it has torch 2.11 + CUDA, numpy, scipy, pandas, pillow,
#                       scikit-image, matplotlib, tqdm, pyyaml, psutil, pytest, pytest-timeout, tabulate, einops):
#                       MONAI and pytorch-ignite, both pure Python, at the versions installed here (the ones the
#                       tests pass with). SimpleITK, itk, nibabel and fire are not needed by the three stages
#                       (see README.md: SimpleITK is imported only by STAPLE fusion, when it is used).
# * .carry/Kvasir-SEG/  a copy of ../shared/data/Kvasir-SEG for the quality stage. Research-only data: both folders
#                       are git-ignored (/.whl/ and /.carry/ in .gitignore) and must never be committed.
#
# Then it checks that everything the device tool sends (tracked and untracked-not-ignored files + the two carried
# folders) stays under 60 MiB (the tool's limit is 64 MiB per call).
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"
DATA_SRC="${KVASIR_SEG:-../shared/data/Kvasir-SEG}"
LIMIT_MIB=60

for ignored in .whl .carry; do
    if ! git check-ignore -q "$ignored/x"; then
        echo "error: $ignored/ is not git-ignored; add /$ignored/ to .gitignore first" >&2
        exit 1
    fi
done

version() { python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
WHEELS=("monai==$(version monai)" "pytorch-ignite==$(version pytorch-ignite)")

rm -rf .whl
mkdir -p .whl
# --no-deps: every requirement of these two (torch, numpy, packaging) is already on the GPU image
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
echo "wheels: $(cd .whl && ls | tr '\n' ' ')"

if [ ! -d "$DATA_SRC/images" ] || [ ! -d "$DATA_SRC/masks" ]; then
    echo "error: Kvasir-SEG not found at $DATA_SRC (set KVASIR_SEG=...)" >&2
    exit 1
fi
rm -rf .carry/Kvasir-SEG
mkdir -p .carry
cp -r "$DATA_SRC" .carry/Kvasir-SEG
chmod -R u+w .carry/Kvasir-SEG  # the shared copy is read-only; a writable copy can be replaced next time
echo "data: .carry/Kvasir-SEG ($(ls .carry/Kvasir-SEG/images | wc -l) images)"

tree_bytes=$(git ls-files -co --exclude-standard -z | du --files0-from=- -cb | tail -n 1 | cut -f 1)
whl_bytes=$(du -sb .whl | cut -f 1)
carry_bytes=$(du -sb .carry | cut -f 1)
total=$((tree_bytes + whl_bytes + carry_bytes))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "carried: tree $(mib "$tree_bytes") MiB + .whl $(mib "$whl_bytes") MiB + .carry $(mib "$carry_bytes") MiB" \
     "= $(mib "$total") MiB (limit ${LIMIT_MIB} MiB)"
if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then
    echo "error: more than ${LIMIT_MIB} MiB would travel" >&2
    exit 1
fi
