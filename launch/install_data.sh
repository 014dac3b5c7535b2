#!/usr/bin/env bash
# Installs the Debian data packages modjax's example pipelines read, when missing:
#   fortunes               -> /usr/share/games/fortunes (character-level text corpus)
#   dataset-fashion-mnist  -> /usr/share/datasets/fashion-mnist (IDX files)
# Needs root and apt-get; otherwise prints what to run and carries on (the loaders
# raise a clear error naming the package when their data is missing).
set -u
need=()
[ -d /usr/share/games/fortunes ] || need+=(fortunes)
ls /usr/share/datasets/fashion-mnist/*-ubyte* >/dev/null 2>&1 || need+=(dataset-fashion-mnist)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian data packages: ${need[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
    || echo "warning: could not install ${need[*]}; tests that need them are skipped"
else
  echo "note: missing data packages ${need[*]}; install with: sudo apt-get install ${need[*]}"
fi
exit 0
