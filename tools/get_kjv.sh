#!/bin/sh
# Dump the King James Bible (public domain) from Debian's bible-kjv-text package into a text file,
# one verse per line ("Ge1:1 In the beginning God created the heaven and the earth.").
#
# bible-kjv-text ships the text only in a compressed, indexed form (/usr/lib/bible.data and
# bible.data.conc); the `bible` program from bible-kjv reads it. `bible -f` turns pretty-printing
# off (one verse per line with its reference) and the range Gen1:1-Rev22:21 is the whole Bible.
#
# Usage: tools/get_kjv.sh [OUTPUT]        (default data/kjv/kjv.txt; data/ is git-ignored)
# Needs root (or sudo) for apt-get when the packages are not installed yet.
set -eu
out="${1:-data/kjv/kjv.txt}"
if ! command -v bible >/dev/null 2>&1 || [ ! -e /usr/lib/bible.data ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y bible-kjv bible-kjv-text
fi
mkdir -p "$(dirname "$out")"
bible -f Gen1:1-Rev22:21 </dev/null >"$out.tmp"
mv "$out.tmp" "$out"
verses=$(wc -l <"$out")
echo "wrote $out: $verses verses, $(wc -c <"$out") bytes"
[ "$verses" -eq 31102 ] || { echo "warning: expected 31102 verses" >&2; exit 1; }
cp /usr/share/doc/bible-kjv-text/copyright "$(dirname "$out")/copyright.bible-kjv-text"
