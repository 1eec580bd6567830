#!/usr/bin/env bash
# Copy the pure-Python packages that the device images lack into third_party/ beside the checkout,
# for benchmarks/device_suite.py on a GPU machine that has jax, flax, optax, orbax, torch and
# torchvision but no package registry.
#
#     bash benchmarks/vendor_deps.sh [DEST]        # DEST defaults to <repo>/third_party
#     PYTHON=.venv/bin/python bash benchmarks/vendor_deps.sh
#
# Copied from the installed packages of $PYTHON (default: .venv/bin/python, else python3):
#   ml_collections  (configs are ml_collections ConfigDicts; absent on the device images)
#   absl, yaml      (ml_collections' own dependencies; orbax needs them too, so the images
#                   normally have them: device_suite.py appends third_party/ to the END of
#                   sys.path, so the image's own copies win and these are only a fallback)
# Only .py files and package data are copied: no compiled extensions (PyYAML's optional libyaml
# binding is left out, PyYAML falls back to its pure-Python loader), no tests, no __pycache__.
# third_party/ is git-ignored; carry it to the device with the run tool's carry=["third_party"].
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo/third_party}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi

mkdir -p "$dest"
for pkg in ml_collections absl yaml; do
  src="$("$PYTHON" -c "import os, $pkg; print(os.path.dirname($pkg.__file__))")" || {
    echo "vendor_deps: $pkg is not importable with $PYTHON; install it there first" >&2; exit 1; }
  rm -rf "${dest:?}/$pkg"
  # Copy the tree without tests, caches and compiled extensions.
  (cd "$(dirname "$src")" && find "$pkg" \
      \( -name __pycache__ -o -name tests -o -name testing -o -name '*_test.py' \) -prune -o \
      -type f ! -name '*.so' ! -name '*.pyc' -print0 | xargs -0 -I{} cp --parents {} "$dest/")
  version="$("$PYTHON" -c "import importlib.metadata as m; print(m.version({'yaml': 'PyYAML', 'absl': 'absl-py'}.get('$pkg', '$pkg')))")"
  echo "$pkg $version <- $src"
done
echo "$(du -sk "$dest" | cut -f1) KiB in $dest (run tool: carry [\"third_party\"])"
