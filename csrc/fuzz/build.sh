#!/usr/bin/env bash
# Builds the libFuzzer targets over the C data path with Debian's clang, two binaries each:
#   build/fuzz/NAME_fuzz  -fsanitize=fuzzer,address,undefined (what `iovirt fuzz` runs)
#   build/fuzz/NAME_cov   -fsanitize=fuzzer plus source-based coverage (for the line
#                         coverage report: replays a corpus with -runs=0)
# for NAME = virtqueue (csrc/virtqueue.c) and blk (csrc/blk.c over virtqueue.c).
# Usage: csrc/fuzz/build.sh [OUTDIR]   (default build/fuzz, relative to the repository)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-build/fuzz}"
mkdir -p "$out"
CC="${CC:-clang}"
if ! command -v "$CC" >/dev/null; then
    echo "csrc/fuzz/build.sh: $CC not found; install Debian's clang (apt-get install clang)" >&2
    exit 1
fi
common=(-std=gnu11 -g -O1 -Wall -Wextra -Werror -Icsrc)
build() {
    local name=$1
    shift
    "$CC" "${common[@]}" -fno-omit-frame-pointer \
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
        "$@" -o "$out/${name}_fuzz"
    "$CC" "${common[@]}" -fsanitize=fuzzer -fprofile-instr-generate -fcoverage-mapping \
        "$@" -o "$out/${name}_cov"
    echo "built $out/${name}_fuzz $out/${name}_cov"
}
build virtqueue csrc/fuzz/virtqueue_fuzz.c csrc/virtqueue.c
build blk csrc/fuzz/blk_fuzz.c csrc/blk.c csrc/virtqueue.c -pthread
