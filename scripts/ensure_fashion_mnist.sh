#!/usr/bin/env bash
# Make sure Fashion-MNIST (Debian package dataset-fashion-mnist) is installed: the demo's data.
# Installs it with apt-get when missing and this user can; otherwise says what to install.
# --optional: only warn when it cannot be installed (the tests then skip the real-data check).
set -uo pipefail
dir=/usr/share/datasets/fashion-mnist
package=dataset-fashion-mnist
[ -f "$dir/train-images-idx3-ubyte.gz" ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing $package (Fashion-MNIST, ~30 MB)" >&2
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package"; } >&2; then
    exit 0
  fi
fi
echo "[setup] Fashion-MNIST is missing: install the Debian package $package" \
     "(sudo apt-get install $package) or set data.root to a folder with its four IDX files" >&2
[ "${1:-}" = "--optional" ] && exit 0
exit 1
