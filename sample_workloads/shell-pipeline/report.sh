#!/bin/sh
# shell-pipeline: word statistics for words.txt using a pipeline of small
# programs. The script itself is only text; what it needs is /bin/sh (the
# shebang interpreter) plus every program it runs, each looked up on PATH at
# run time, plus whatever shared libraries those programs link.
set -eu
LC_ALL=C
export LC_ALL
here=$(dirname "$0")
data="$here/words.txt"

echo "== shell-pipeline report =="
printf 'lines: %s\n' "$(wc -l < "$data" | tr -d ' ')"
printf 'words: %s\n' "$(wc -w < "$data" | tr -d ' ')"
printf 'bytes: %s\n' "$(wc -c < "$data" | tr -d ' ')"

echo "-- top 5 words --"
tr 'A-Z' 'a-z' < "$data" | tr -cs 'a-z' '\n' | grep -v '^$' \
    | sort | uniq -c | sort -k1,1nr -k2,2 | head -n 5 \
    | awk '{ printf "%-8s %2d\n", $2, $1 }'

echo "-- distinct words by length --"
tr 'A-Z' 'a-z' < "$data" | tr -cs 'a-z' '\n' | grep -v '^$' | sort -u \
    | awk '{ n[length($0)]++ } END { for (l in n) print l, n[l] }' \
    | sort -n | awk '{ printf "len %2d: %d\n", $1, $2 }'

echo "-- longest line --"
awk '{ if (length($0) > max) { max = length($0); line = NR } } END { print "line " line " (" max " chars)" }' "$data"

echo "-- checksum --"
cksum < "$data" | cut -d' ' -f1
