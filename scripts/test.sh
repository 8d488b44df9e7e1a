#!/usr/bin/env bash
# The test command: installs what it needs, builds, runs the whole suite
# (unit tests and tests on real FUSE mounts) with ctest.
#   scripts/test.sh            the regular build
#   scripts/test.sh --asan     also an ASan+UBSan build of the suite
#   scripts/test.sh --tsan     also a TSan build of the suite
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
ctest --test-dir build --output-on-failure

for arg in "$@"; do
  case "$arg" in
    --asan) san=address dir=build-asan ;;
    --tsan) san=thread dir=build-tsan ;;
    *) echo "test.sh: unknown argument '$arg': use --asan or --tsan" >&2; exit 2 ;;
  esac
  BUILD_DIR=$dir CMAKE_ARGS="-DDEFERFS_SANITIZE=$san" scripts/setup.sh
  ctest --test-dir "$dir" --output-on-failure
done
