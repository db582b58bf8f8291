#!/usr/bin/env bash
# Installs libfedcdd for C, C++ and Python users:
#   PREFIX/include/fedcdd.h
#   PREFIX/lib/libfedcdd.so (libfedcdd.dylib on macOS) and PREFIX/lib/libfedcdd.a
#   PREFIX/lib/pkgconfig/fedcdd.pc                      (pkg-config --cflags --libs fedcdd)
#   PREFIX/lib/cmake/fedcdd/fedcdd-config.cmake         (find_package(fedcdd) in CMake)
#   PREFIX/lib/cmake/fedcdd/fedcdd-config-version.cmake
#
# Usage: ffi/install.sh PREFIX [--debug] [--lib-dir DIR]
#   By default it first runs `cargo build --release -p fedcdd-ffi` and installs from the
#   workspace's target/release (or $CARGO_TARGET_DIR/release); --debug uses the dev profile;
#   --lib-dir DIR installs already built libraries from DIR without running cargo.
# Example: ffi/install.sh "$HOME/.local" && export PKG_CONFIG_PATH="$HOME/.local/lib/pkgconfig"
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

prefix=""
lib_dir=""
profile="release"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --debug) profile="debug"; shift ;;
    --lib-dir)
      [[ $# -ge 2 ]] || { echo "install.sh: --lib-dir needs a directory" >&2; exit 2; }
      lib_dir="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *)
      [[ -z "$prefix" ]] || { echo "install.sh: more than one PREFIX given" >&2; exit 2; }
      prefix="$1"; shift ;;
  esac
done
[[ -n "$prefix" ]] || { usage >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

if [[ -z "$lib_dir" ]]; then
  if [[ "$profile" == "release" ]]; then
    cargo build --manifest-path "$root/Cargo.toml" -p fedcdd-ffi --release
  else
    cargo build --manifest-path "$root/Cargo.toml" -p fedcdd-ffi
  fi
  lib_dir="${CARGO_TARGET_DIR:-$root/target}/$profile"
fi

# The version of the workspace (ffi/Cargo.toml takes it from [workspace.package]).
version="$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$root/Cargo.toml")"
[[ -n "$version" ]] || { echo "install.sh: no version in $root/Cargo.toml" >&2; exit 1; }

case "$(uname -s)" in
  Darwin) shared="libfedcdd.dylib" ;;
  *) shared="libfedcdd.so" ;;
esac
for f in "$lib_dir/$shared" "$lib_dir/libfedcdd.a"; do
  [[ -f "$f" ]] || { echo "install.sh: $f is missing (build fedcdd-ffi first)" >&2; exit 1; }
done

mkdir -p "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/lib/cmake/fedcdd"
prefix="$(cd "$prefix" && pwd)"
install -m 644 "$here/include/fedcdd.h" "$prefix/include/fedcdd.h"
install -m 755 "$lib_dir/$shared" "$prefix/lib/$shared"
install -m 644 "$lib_dir/libfedcdd.a" "$prefix/lib/libfedcdd.a"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" "$here/fedcdd.pc.in" \
  > "$prefix/lib/pkgconfig/fedcdd.pc"
install -m 644 "$here/cmake/fedcdd-config.cmake" "$prefix/lib/cmake/fedcdd/fedcdd-config.cmake"
sed -e "s|@VERSION@|$version|g" "$here/cmake/fedcdd-config-version.cmake.in" \
  > "$prefix/lib/cmake/fedcdd/fedcdd-config-version.cmake"
echo "installed libfedcdd $version into $prefix"
