#!/bin/sh
# Removes from the image's virtualenv what serving never uses (run in the Dockerfile's
# builder stages, after the install; sizes measured on the CPU image, docs/deploy.md):
#   tensorflow/include        C++ headers for building custom ops          430 MB
#   symbol tables of TF's .so (strip --strip-unneeded; .dynsym stays)      ~230 MB
#   libclang                  TensorFlow's build-time binding to clang       62 MB
#   pip, setuptools, wheel    nothing is installed at run time               24 MB
#   grpcio-tools              protoc, used once to generate service/_proto    8 MB
#   test suites of numpy, scipy, scikit-learn (and tf2onnx's stray tests/)   ~70 MB
# Only TensorFlow's own libraries are stripped: numpy's and scipy's bundled libraries are
# rewritten by auditwheel (patchelf), which strip can corrupt.
#
#   scripts/image_slim.sh /opt/venv
set -eu
VENV=$1
SITE=$(echo "$VENV"/lib/python3*/site-packages)
PY="$VENV/bin/python"

"$PY" -m pip uninstall -y -q grpcio-tools libclang
rm -rf "$SITE/tensorflow/include" "$SITE/tests"
for pkg in numpy scipy sklearn; do
    find "$SITE/$pkg" -depth -type d -name tests -exec rm -rf {} +
done
if command -v strip >/dev/null; then
    find "$SITE/tensorflow" -type f -name '*.so*' -exec strip --strip-unneeded {} +
else
    echo "image_slim: no strip (binutils) here; TensorFlow's libraries keep their symbol tables" >&2
fi
"$PY" -m pip uninstall -y -q pip setuptools wheel  # last: pip removes itself
