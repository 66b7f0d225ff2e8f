#!/usr/bin/env bash
# DALI for the GPU machine, in parts that each fit one device call (bench/GPU.md, "DALI").
#
#   bash bench/dali_parts.sh prepare          here: .dali/part-00 ... part-NN and .dali/MANIFEST
#   bash bench/dali_parts.sh install SITE     there: check the parts against MANIFEST, unpack into SITE
#
# The GPU machine has no DALI and cannot download. DALI and what it needs for Python 3.12 (the machine's) are
# 255 MiB of wheels, over the 64 MiB a call can carry. A wheel is a zip of what `pip install --target` would lay
# out, so `prepare` unpacks them all into one tree, packs it as tar.xz (183 MiB: xz beats the wheels' deflate) and
# splits it into parts of 48 MiB, each with room beside the working tree in one call. `install` rejoins the parts
# and unpacks the tree into SITE, the folder bench/gpu_suite.sh puts on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DALI_PARTS_DIR:-.dali}
PART_BYTES=$((48 * 1024 * 1024))
# DALI's own wheel and its Requires-Dist (nvimgcodec[all] for the mixed JPEG decoder, with nvjpeg and nvcomp);
# the machine already has numpy, six and packaging
WHEELS=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
        nvidia-nvjpeg==13.3.2.43 astunparse==1.6.3 gast==0.7.0 makefun==1.16.0 libcst==1.9.0 optree==0.20.0
        nvtx==0.2.17)

case "${1:-}" in
  prepare)
    if [ -f "$DIR/MANIFEST" ]; then echo "dali_parts: $DIR already prepared ($(grep -c part- "$DIR/MANIFEST") parts)"
                                    exit 0; fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$tmp/wheels" "${WHEELS[@]}"
    mkdir -p "$tmp/site" "$DIR"
    for w in "$tmp"/wheels/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
    tar -C "$tmp/site" -cf - . | xz -T0 -6 > "$tmp/site.tar.xz"
    split -b "$PART_BYTES" -d -a 2 "$tmp/site.tar.xz" "$DIR/part-"
    { echo "archive $(sha256sum < "$tmp/site.tar.xz" | cut -d' ' -f1)"
      for p in "$DIR"/part-*; do echo "$(basename "$p") $(sha256sum < "$p" | cut -d' ' -f1)"; done
    } > "$DIR/MANIFEST.part"
    mv "$DIR/MANIFEST.part" "$DIR/MANIFEST"
    echo "dali_parts: $(ls "$DIR" | grep -c part-) parts of <= 48 MiB in $DIR ($(du -sh "$DIR" | cut -f1) in all)"
    ;;
  install)
    SITE=${2:?install needs the target folder}
    [ -f "$DIR/MANIFEST" ] || { echo "dali_parts: no $DIR/MANIFEST: the parts were not carried" >&2; exit 2; }
    missing=0
    while read -r name sum; do
      [ "$name" = archive ] && continue
      if [ ! -f "$DIR/$name" ] || [ "$(sha256sum < "$DIR/$name" | cut -d' ' -f1)" != "$sum" ]; then
        echo "dali_parts: $DIR/$name is missing or differs from MANIFEST" >&2; missing=1
      fi
    done < "$DIR/MANIFEST"
    [ $missing -eq 0 ] || exit 2
    mkdir -p "$SITE"
    cat $(grep -o '^part-[0-9]*' "$DIR/MANIFEST" | sed "s|^|$DIR/|") | xz -d | tar -C "$SITE" -xf -
    echo "dali_parts: DALI unpacked into $SITE"
    ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
