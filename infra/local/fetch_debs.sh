#!/usr/bin/env bash
# Fetch Debian packages the project uses without installing them system-wide:
#   prometheus            -> .cache/debs/prometheus/usr/bin/prometheus   (the stack's and tests' scraper)
#   dataset-fashion-mnist -> .cache/debs/fashion-mnist/usr/share/datasets/fashion-mnist/*.gz
# Idempotent: a package already extracted is skipped.
set -euo pipefail
dest="${1:-.cache/debs}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
declare -A want=([prometheus]=prometheus/usr/bin/prometheus [dataset-fashion-mnist]=fashion-mnist/usr/share/datasets/fashion-mnist)
declare -A dir=([prometheus]=prometheus [dataset-fashion-mnist]=fashion-mnist)
updated=0
for pkg in prometheus dataset-fashion-mnist; do
  if [ -e "$dest/${want[$pkg]}" ]; then continue; fi
  if [ "$updated" = 0 ]; then apt-get update -qq >/dev/null 2>&1 || true; updated=1; fi
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null)
  dpkg -x "$tmp"/"$pkg"_*.deb "$dest/${dir[$pkg]}"
  rm -rf "$tmp"
  echo "fetched $pkg -> $dest/${dir[$pkg]}"
done
