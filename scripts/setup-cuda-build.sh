#!/usr/bin/env bash
# Prepares a Debian/Ubuntu machine to build `kd --features cuda` without internet access to
# GitHub releases.
#
# Burn's CUDA runtime (cubecl-cuda 0.11) always links cubecl-llvm, whose build dependency
# tracel-llvm-bundler 23.1.0-4 downloads a prebuilt LLVM into
#   ${XDG_DATA_HOME:-~/.local/share}/tracel/tracel-llvm-23.1.0-4
# unless that folder already holds the marker file `.tracel-llvm-installed`. The bundler only
# runs `<folder>/bin/llvm-config --link-static ...` from there, so this script points that
# llvm-config at the distribution's LLVM 22 (every LLVM C function cubecl uses exists in it).
# The wrapper rewrites two things of Debian's llvm-config output that the bundler cannot use:
#   - absolute `.so` paths in --system-libs (e.g. /usr/lib/x86_64-linux-gnu/libz3.so), which the
#     bundler would turn into `-llibz3`, become `-lz3`;
#   - `-lPolly -lPollyISL` in --libs (not shipped by llvm-22-dev, unused by cubecl) are dropped.
# Nothing is patched or stubbed: the crates build unchanged against real LLVM libraries.
#
# Usage: scripts/setup-cuda-build.sh            (then: cargo build --release --features cuda)
set -euo pipefail

LLVM_CONFIG=/usr/lib/llvm-22/bin/llvm-config
if [ ! -x "$LLVM_CONFIG" ]; then
    echo "installing llvm-22-dev and libzstd-dev (needs root)" >&2
    apt-get install -y llvm-22-dev libzstd-dev
fi

DIR="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-23.1.0-4"
mkdir -p "$DIR/bin"
cat > "$DIR/bin/llvm-config" <<EOS
#!/usr/bin/env bash
# Written by kd's scripts/setup-cuda-build.sh: Debian's LLVM 22 for tracel-llvm-bundler.
set -o pipefail
$LLVM_CONFIG "\$@" | sed -E 's#(^| )/[^ ]*/lib([A-Za-z0-9_+-]+)\.so#\1-l\2#g; s#(^| )-lPolly(ISL)?\b##g'
EOS
chmod +x "$DIR/bin/llvm-config"
touch "$DIR/.tracel-llvm-installed"
echo "tracel-llvm-bundler will use $("$DIR/bin/llvm-config" --version) from $DIR"
