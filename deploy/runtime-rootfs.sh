#!/bin/sh
# Copies an executable and the shared libraries it links, as ldd lists them, into a root
# filesystem tree: the agent image carries that tree and nothing else.
#   runtime-rootfs.sh <executable> <root dir>   -> <root>/usr/local/bin/<name> + its libraries
set -eu
bin=$1
root=$2
mkdir -p "$root/usr/local/bin"
cp "$bin" "$root/usr/local/bin/"
ldd "$bin" | while read -r first second third _rest; do
    # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"
    if [ "$second" = "=>" ]; then lib=$third; else lib=$first; fi
    case "$lib" in
        /*) ;;
        *) continue ;; # linux-vdso.so.1: provided by the kernel, no file
    esac
    mkdir -p "$root$(dirname "$lib")"
    # the real file, not the distribution's symlink to it
    cp -L "$lib" "$root$lib"
done
