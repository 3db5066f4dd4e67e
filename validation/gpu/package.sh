#!/usr/bin/env bash
# Builds the binary for the GPU check and packs it with the shared libraries it links that a bare CUDA
# machine may lack (OpenBLAS, fontconfig, freetype and theirs), into validation/gpu/bin (git-ignored).
# run.sh unpacks them to a temporary folder and puts it last on the binary's library path, so the machine's own copies win where present.
#
# Usage (repository root, on a machine with Rust; no GPU needed): bash validation/gpu/package.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"
cargo build --release --features cuda
rm -rf "$HERE/bin" && mkdir -p "$HERE/bin/lib"
strip -o "$HERE/bin/moe-dmft" target/release/moe-dmft
# Every linked library except the C runtime itself, which the target machine always has.
ldd "$HERE/bin/moe-dmft" | awk '/=> \// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so.*|libm.so.*|libgcc_s.so.*|ld-linux*|libpthread.so.*|libdl.so.*|librt.so.*) ;;
    *) cp -L "$lib" "$HERE/bin/lib/" ;;
  esac
done
# Packed: the device tool carries at most 64 MiB, and OpenBLAS alone is 36 MB. run.sh unpacks it.
tar -C "$HERE/bin" -cJf "$HERE/bin/lib.tar.xz" lib && rm -rf "$HERE/bin/lib"
# The sweeps' corpus, when it is here (the first `train` or `sweep` on Shakespeare downloads it): it
# travels xz-compressed (9.6 MB raw, 2.4 MB packed), since with the committed results folders the tracked
# tree, the binary and the raw corpus together pass the tool's 64 MiB. Unpack on the device with
# `xz -dc validation/gpu/bin/corpus.txt.xz > data-cache/shakespeare/corpus.txt`.
if [ -f data-cache/shakespeare/corpus.txt ]; then
  xz -9 -kc data-cache/shakespeare/corpus.txt >"$HERE/bin/corpus.txt.xz"
fi
du -sh "$HERE/bin"/*
