#!/usr/bin/env bash
# Make sure the Fashion-MNIST idx files are present (Debian package dataset-fashion-mnist).
# Never fails the set-up: without the data only the Fashion-MNIST job and its test cannot run.
set -uo pipefail
DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if [ "$DIR" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  echo "[setup] installing Debian package dataset-fashion-mnist"
  { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; } >/tmp/specialists-apt.log 2>&1
fi
if [ ! -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  cat >&2 <<MSG
[setup] Fashion-MNIST is not in $DIR and 'apt-get install dataset-fashion-mnist' did not put it there
        (log: /tmp/specialists-apt.log). Put the four idx .gz files (train-images-idx3-ubyte.gz,
        train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a
        directory and run with FASHION_MNIST_DIR=/that/dir, or pass
        --set data.source=fashion-mnist:/that/dir to specialists.
MSG
fi
exit 0
