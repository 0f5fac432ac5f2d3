#!/usr/bin/env bash
# Fetch the CUTLASS C++ headers (include/ and tools/util/include/) from the
# PyPI wheel `nvidia-cutlass` into third_party/cutlass/ (git-ignored; nothing
# fetched is committed). setup.py and CMakeLists.txt look there unless
# FLORA_CUTLASS_DIR names another copy.
#
#   tools/fetch_cutlass.sh [DEST]      (default: third_party/cutlass)
#
# Also fetches cuobjdump (wheel `nvidia-cuda-cuobjdump`) into DEST/bin for the
# SASS check (tools/check_cuda_kernels.py) when no cuobjdump is on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/third_party/cutlass}"
VERSION="${FLORA_CUTLASS_VERSION:-4.2.0.0}"
PY="${PYTHON:-python3}"

if [ -f "$DEST/include/cutlass/version.h" ] && [ -f "$DEST/.version" ] \
   && [ "$(cat "$DEST/.version")" = "$VERSION" ]; then
  echo "cutlass $VERSION already in $DEST"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --dest "$tmp" "nvidia-cutlass==$VERSION"
if ! command -v cuobjdump >/dev/null && [ ! -x /usr/local/cuda/bin/cuobjdump ]; then
  "$PY" -m pip download -q --no-deps --dest "$tmp" nvidia-cuda-cuobjdump || true
fi
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" - "$tmp" "$DEST" <<'PYEOF'
import glob, os, shutil, stat, sys, zipfile
tmp, dest = sys.argv[1:]
keep = {
    "cutlass_library/source/include/": "include/",
    "cutlass_library/source/tools/util/include/": "tools/util/include/",
    "cutlass_library/source/LICENSE.txt": "LICENSE.txt",
    "nvidia/cu13/bin/cuobjdump": "bin/cuobjdump",
}
n = 0
for whl in glob.glob(os.path.join(tmp, "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            for src, dst in keep.items():
                if name.startswith(src) and not name.endswith("/"):
                    out = os.path.join(dest, dst + name[len(src):])
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with z.open(name) as f, open(out, "wb") as g:
                        shutil.copyfileobj(f, g)
                    if out.endswith("bin/cuobjdump"):
                        os.chmod(out, os.stat(out).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                    n += 1
print(f"unpacked {n} files into {dest}")
PYEOF
echo "$VERSION" > "$DEST/.version"
test -f "$DEST/include/cutlass/version.h"
