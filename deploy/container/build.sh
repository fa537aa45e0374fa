#!/usr/bin/env bash
# Builds the imgsvc container image without a registry or a base image:
# FROM scratch, the release imgsvc-server, the dynamic loader and shared
# libraries it links (read from the binary with ldd, not a hand-kept list),
# and /etc/passwd and /etc/group naming uid/gid 10001. Nothing else: no
# shell, no package manager, no CA store.
#
# Usage: deploy/container/build.sh [--binary PATH] [--tag IMAGE] [--save FILE] [--no-strip]
#   --binary PATH  the imgsvc-server to package (default: build it with
#                  cargo build --release --locked --bin imgsvc-server)
#   --no-strip     keep the binary's line tables (file:line in backtraces;
#                  about 6x the size). By default they are stripped
#                  (strip --strip-debug: function names stay).
#   --tag IMAGE    the image name (default: localhost/imgsvc:<Cargo.toml
#                  version>, which deploy/kubernetes/deployment.yaml names)
#   --save FILE    also write the image as an OCI archive, to load into a
#                  cluster's nodes or push with skopeo
# Tool: $CONTAINER_TOOL if set, else podman, else buildah, else docker (if
# its daemon answers). Debian: apt-get install podman. Prints the sizes of
# what it packaged, then the image name as the last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)"
binary=""
tag="localhost/imgsvc:$version"
save=""
strip=1
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --save) save="$2"; shift 2 ;;
        --no-strip) strip=0; shift ;;
        -h | --help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
done

tool="${CONTAINER_TOOL:-}"
if [ -z "$tool" ]; then
    if command -v podman >/dev/null; then tool=podman
    elif command -v buildah >/dev/null; then tool=buildah
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then tool=docker
    else
        echo "build.sh: neither podman, buildah nor a running docker found (Debian: apt-get install podman)" >&2
        exit 69
    fi
fi

if [ -z "$binary" ]; then
    (cd "$root" && cargo build --release --locked --bin imgsvc-server)
    binary="$root/target/release/imgsvc-server"
fi
[ -x "$binary" ] || { echo "build.sh: $binary is not an executable" >&2; exit 66; }

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
rootfs="$context/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc"
install -m 0755 "$binary" "$rootfs/usr/local/bin/imgsvc-server"
if [ "$strip" = 1 ]; then
    command -v strip >/dev/null || { echo "build.sh: strip not found (Debian: apt-get install binutils), or pass --no-strip" >&2; exit 69; }
    strip --strip-debug "$rootfs/usr/local/bin/imgsvc-server"
fi
# Every absolute path ldd prints: the libraries and the dynamic loader, each
# at the path the binary asks for (symlinks resolved).
libs="$(ldd "$binary" | grep -o '/[^ ]*' | sort -u || true)"
for lib in $libs; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
echo 'imgsvc:x:10001:10001:imgsvc:/nonexistent:/sbin/nologin' >"$rootfs/etc/passwd"
echo 'imgsvc:x:10001:' >"$rootfs/etc/group"
cp "$here/Containerfile" "$context/Containerfile"
binary_bytes="$(stat -c %s "$rootfs/usr/local/bin/imgsvc-server")"
total_bytes="$(du -sb "$rootfs" | cut -f1)"
echo "packaged imgsvc-server $binary_bytes bytes, everything $total_bytes bytes"

labels=(--label "org.opencontainers.image.title=imgsvc" --label "org.opencontainers.image.version=$version")
case "$tool" in
    podman | docker) "$tool" build "${labels[@]}" -t "$tag" -f "$context/Containerfile" "$context" >&2 ;;
    buildah) buildah bud "${labels[@]}" -t "$tag" -f "$context/Containerfile" "$context" >&2 ;;
    *) echo "build.sh: unknown CONTAINER_TOOL $tool (podman, buildah or docker)" >&2; exit 64 ;;
esac
if [ -n "$save" ]; then
    case "$tool" in
        podman) podman save --format oci-archive -o "$save" "$tag" >&2 ;;
        buildah) buildah push "$tag" "oci-archive:$save" >&2 ;;
        docker) docker save -o "$save" "$tag" >&2 ;;
    esac
fi
echo "$tag"
