#!/usr/bin/env bash
# Run a command inside a throwaway QEMU/KVM VM whose kernel has the kernel-TLS
# module (`tls`), with the host's root filesystem as a discardable overlay.
# See tests/vm/README.md.
#
#   tests/vm/run.sh [--cpus N] [--mem MiB] [--timeout SECONDS] [--accel auto|kvm|tcg] -- COMMAND [ARGS...]
#
# Exit status: COMMAND's exit status; 124 if the timeout expired; 125 if the
# VM could not be set up or booted, or did not report a status.
set -euo pipefail

PROG=tests/vm/run.sh
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")

die() {
  echo "$PROG: error: $*" >&2
  exit 125
}
note() { echo "$PROG: $*" >&2; }

usage() {
  cat >&2 <<'EOF'
usage: tests/vm/run.sh [--cpus N] [--mem MiB] [--timeout SECONDS] [--accel auto|kvm|tcg]
                       -- COMMAND [ARGS...]
  --cpus N           virtual CPUs (default 2)
  --mem MiB          guest memory in MiB (default 4096)
  --timeout SECONDS  wall-clock limit for setup + boot + command (default 900)
  --accel MODE       kvm, tcg (software emulation) or auto (default: kvm if it
                     can run a stock kernel, else tcg; see README.md)
Environment: IMGSVC_VM_KERNEL (the Debian suite whose linux-image-amd64 the VM
  boots, default trixie-backports; host or the host's own suite, e.g. bookworm:
  the host apt's kernel), IMGSVC_VM_HOME (cache, default $HOME/.cache/imgsvc-vm),
  IMGSVC_VM_REFRESH=1 (re-resolve and re-download the Debian kernel),
  IMGSVC_VM_ACCEL (default for --accel), IMGSVC_VM_CPU (QEMU -cpu model).
  IMGSVC_VM_MODULES (extra kernel modules to modprobe before the command),
  IMGSVC_VM_TRACE=1 (print boot step timings).
Passed into the VM: PATH, HOME, USER, LOGNAME, LANG, LC_*, TZ, TERM, NO_COLOR,
  CLICOLOR, CLICOLOR_FORCE and every variable starting with IMGSVC_, RUST_ or CARGO_.
EOF
  exit 2
}

CPUS=2
MEM=4096
KSUITE=${IMGSVC_VM_KERNEL:-trixie-backports}
TIMEOUT=900
ACCEL=${IMGSVC_VM_ACCEL:-auto}
while [ $# -gt 0 ]; do
  case $1 in
    --cpus) [ $# -ge 2 ] || usage; CPUS=$2; shift 2 ;;
    --cpus=*) CPUS=${1#*=}; shift ;;
    --mem) [ $# -ge 2 ] || usage; MEM=$2; shift 2 ;;
    --mem=*) MEM=${1#*=}; shift ;;
    --timeout) [ $# -ge 2 ] || usage; TIMEOUT=$2; shift 2 ;;
    --timeout=*) TIMEOUT=${1#*=}; shift ;;
    --accel) [ $# -ge 2 ] || usage; ACCEL=$2; shift 2 ;;
    --accel=*) ACCEL=${1#*=}; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) echo "$PROG: unexpected argument '$1' (the command goes after --)" >&2; usage ;;
  esac
done
[ $# -gt 0 ] || usage
for v in "$CPUS" "$MEM" "$TIMEOUT"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || die "--cpus, --mem and --timeout take positive integers (got '$v')"
done
[[ $KSUITE =~ ^[a-z0-9][a-z0-9.+-]*$ ]] \
  || die "IMGSVC_VM_KERNEL takes a Debian suite (trixie-backports, sid...) or host (got '$KSUITE')"

T_START=$(date +%s.%N)
DEADLINE=$(( $(date +%s) + TIMEOUT ))
remaining() { echo $(( DEADLINE - $(date +%s) )); }
# bounded LIMIT CMD...: run CMD for at most min(LIMIT, time left) seconds
bounded() {
  local limit=$1 r
  shift
  r=$(remaining)
  if [ "$r" -le 0 ]; then
    echo "$PROG: the ${TIMEOUT}s timeout expired during VM setup" >&2
    return 124
  fi
  [ "$r" -lt "$limit" ] && limit=$r
  timeout -k 5 "$limit" "$@"
}

# --- accelerator ---------------------------------------------------------------
# KVM when it can run a stock kernel; otherwise TCG (software emulation).
# Under PVM (kvm_pvm, e.g. inside a Firecracker VM), /dev/kvm works but only
# PVM-enabled guest kernels run at usable speed: a stock Debian kernel takes
# minutes to decompress and to get through early boot, so TCG is chosen.
kvm_usable() { [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; }
kvm_is_pvm() { [ -d /sys/module/kvm_pvm ]; }
case $ACCEL in
  auto)
    if ! kvm_usable; then
      note "KVM is unavailable (/dev/kvm missing or not read-writable): using TCG software emulation (slower)"
      ACCEL=tcg
    elif kvm_is_pvm; then
      note "this host's KVM is PVM (kvm_pvm), which runs a stock kernel far too slowly: using TCG software emulation"
      ACCEL=tcg
    else
      ACCEL=kvm
    fi
    ;;
  kvm)
    kvm_usable || die "KVM is unavailable: /dev/kvm is missing or not readable and writable by $(id -un) (use --accel tcg for software emulation)"
    kvm_is_pvm && note "warning: this host's KVM is PVM (kvm_pvm); a stock kernel boots extremely slowly under it"
    ;;
  tcg) ;;
  *) die "--accel takes auto, kvm or tcg (got '$ACCEL')" ;;
esac
if [ "$ACCEL" = kvm ]; then
  if kvm_is_pvm; then
    # PVM rejects the IA32_ARCH_CAPABILITIES MSR value that QEMU sets for -cpu host
    accel_args=(-accel kvm -cpu "${IMGSVC_VM_CPU:-host,-arch-capabilities}")
  else
    accel_args=(-accel kvm -cpu "${IMGSVC_VM_CPU:-host}")
  fi
else
  accel_args=(-accel tcg,thread=multi -cpu "${IMGSVC_VM_CPU:-max}")
fi

# --- cache / setup -----------------------------------------------------------
VM_HOME=${IMGSVC_VM_HOME:-${HOME:?neither IMGSVC_VM_HOME nor HOME is set}/.cache/imgsvc-vm}
mkdir -p "$VM_HOME"
VM_HOME=$(cd "$VM_HOME" && pwd -P)

# The kernel: linux-image-amd64 of the Debian suite $KSUITE. The host's own
# suite comes through the host's apt, cached as before this variable existed
# (kernel/<version>/, initramfs-<version>.cpio.gz); any other suite through a
# private apt configuration under kernel-<suite>/apt, cached in kernel-<suite>/.
# shellcheck disable=SC1091
HOST_SUITE=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || HOST_SUITE=
[ "$KSUITE" = "$HOST_SUITE" ] && KSUITE=host
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
if [ "$KSUITE" = host ]; then
  KCACHE=$VM_HOME/kernel
  IMG_DIR=$VM_HOME
  APT_ENV=()
else
  KCACHE=$VM_HOME/kernel-$KSUITE
  IMG_DIR=$KCACHE
  APT_ENV=(env "APT_CONFIG=$KCACHE/apt/apt.conf")
fi

RUN_DIR=
QEMU_PID=
INITRAMFS_TMP=
cleanup() {
  if [ -n "$INITRAMFS_TMP" ]; then
    rm -rf -- "$INITRAMFS_TMP"
  fi
  if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
    kill -TERM "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
  fi
  if [ -n "$RUN_DIR" ] && [ -d "$RUN_DIR" ]; then
    rm -rf -- "$RUN_DIR"
  fi
}
trap cleanup EXIT
trap 'echo "$PROG: interrupted" >&2; exit 130' INT
trap 'echo "$PROG: terminated" >&2; exit 143' TERM HUP

# apt-get install (the host's apt) PACKAGE...
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "missing $* and apt-get is not available"
  note "installing $* (apt-get)"
  if ! bounded 600 env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2; then
    bounded 300 apt-get update -q >&2 || die "apt-get update failed"
    bounded 600 env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
      || die "apt-get install $* failed"
  fi
}

ensure_packages() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
  # the static busybox goes into the initramfs
  { command -v busybox >/dev/null 2>&1 && dpkg -s busybox-static >/dev/null 2>&1; } || missing+=(busybox-static)
  [ ${#missing[@]} -eq 0 ] && return 0
  apt_install "${missing[@]}"
  command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 still missing after install"
}

# ensure_tool COMMAND PACKAGE: install PACKAGE if COMMAND is missing
ensure_tool() {
  command -v "$1" >/dev/null 2>&1 && return 0
  apt_install "$2"
  command -v "$1" >/dev/null 2>&1 || die "$1 still missing after installing $2"
}

# decompressor for a file extension: prints the command (installing it if needed)
decompressor() {
  case $1 in
    xz) ensure_tool xz xz-utils; echo xz ;;
    zst) ensure_tool zstd zstd; echo zstd ;;
    gz) echo gzip ;;
    *) return 1 ;;
  esac
}

# The private apt configuration for $KSUITE: deb.debian.org's $KSUITE/main
# only, verified with the host's Debian archive keyring; none of the host's
# sources, apt.conf.d, preferences, keys or dpkg status.
apt_private_config() {
  local a=$KCACHE/apt
  [ -f "$KEYRING" ] || die "$KEYRING (package debian-archive-keyring) is missing: it verifies the $KSUITE archive"
  mkdir -p "$a"/etc/apt.conf.d "$a"/etc/preferences.d "$a"/etc/sources.list.d "$a"/etc/trusted.gpg.d \
    "$a"/lists/partial "$a"/cache/archives/partial
  : >"$a/status"
  cat >"$a/etc/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $KSUITE
Components: main
Signed-By: $KEYRING
EOF
  {
    echo '// generated by tests/vm/run.sh: resolves and downloads only the kernel packages of one suite'
    printf '%s "%s";\n' \
      Dir::Etc::Main "$a/etc/apt.conf" \
      Dir::Etc::Parts "$a/etc/apt.conf.d" \
      Dir::Etc::SourceList "$a/etc/sources.list" \
      Dir::Etc::SourceParts "$a/etc/sources.list.d" \
      Dir::Etc::Preferences "$a/etc/preferences" \
      Dir::Etc::PreferencesParts "$a/etc/preferences.d" \
      Dir::Etc::Trusted "$a/etc/trusted.gpg" \
      Dir::Etc::TrustedParts "$a/etc/trusted.gpg.d" \
      Dir::State "$a" \
      Dir::State::Lists "$a/lists" \
      Dir::State::status "$a/status" \
      Dir::Cache "$a/cache" \
      Dir::Cache::pkgcache "" \
      Dir::Cache::srcpkgcache "" \
      APT::Architecture amd64 \
      APT::Architectures amd64 \
      APT::Sandbox::User root \
      Acquire::Languages none
    # the host's proxies, and its Valid-Until/Date checks (off where the
    # mirror serves snapshots, as on this workplace's machines)
    apt-config dump 2>/dev/null | grep -E '^Acquire::((http|https)::Proxy|Check-Valid-Until|Check-Date)' || true
  } >"$a/apt.conf"
}

# The versioned image package that linux-image-amd64 depends on.
apt_kernel_pkg() {
  "${APT_ENV[@]}" apt-cache depends linux-image-amd64 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

# kernel_packages IMAGE_PKG VERSION: the image package and every package of
# that kernel release (name ending in -VERSION) it depends on, directly or not:
# from Debian 13's kernels on, the image is a metapackage for linux-base-,
# linux-binary- (vmlinuz) and linux-modules-VERSION; 6.1's is one package.
kernel_packages() {
  local ver=$2 queue=("$1") seen=" " p d
  while [ ${#queue[@]} -gt 0 ]; do
    p=${queue[0]}
    queue=("${queue[@]:1}")
    case $seen in *" $p "*) continue ;; esac
    seen="$seen$p "
    echo "$p"
    while IFS= read -r d; do queue+=("$d"); done < <(
      "${APT_ENV[@]}" apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$p" 2>/dev/null \
        | awk -v sfx="-$ver" '$1 ~ /^\|?(Pre)?Depends:$/ && length($2) > length(sfx) &&
            substr($2, length($2) - length(sfx) + 1) == sfx { print $2 }')
  done
}

# Unpacked packages -> the layout the rest expects: lib/modules/<ver>/ with the
# modules, boot/vmlinuz-<ver> and boot/config-<ver>. Newer packages ship
# usr/lib/modules/<ver>/{vmlinuz,config,System.map} and no boot/.
normalize_kernel_tree() {
  local root=$1 ver=$2 f
  if [ ! -d "$root/lib/modules/$ver" ] && [ -d "$root/usr/lib/modules/$ver" ]; then
    mkdir -p "$root/lib/modules"
    mv "$root/usr/lib/modules/$ver" "$root/lib/modules/$ver"
  fi
  mkdir -p "$root/boot"
  for f in vmlinuz config System.map; do
    if [ ! -e "$root/boot/$f-$ver" ] && [ -f "$root/lib/modules/$ver/$f" ]; then
      ln "$root/lib/modules/$ver/$f" "$root/boot/$f-$ver"
    fi
  done
}

# decompress_modules MODDIR EXT: every *.ko.EXT under MODDIR -> *.ko
decompress_modules() {
  local tool args=(-d -q -f)
  tool=$(decompressor "$2") || die "no decompressor for modules compressed as .$2"
  # (xz and gzip remove what they decompress; zstd keeps it unless told)
  [ "$tool" = zstd ] && args+=(--rm)
  find "$1" -name "*.ko.$2" -print0 \
    | bounded 600 xargs -0 -r -P "$(nproc)" -n 64 "$tool" "${args[@]}" \
    || die "decompressing the .ko.$2 modules in $1 failed"
}

# Resolve, download and unpack the Debian kernel; prints its version.
ensure_kernel() {
  local ver pkg pkgs
  mkdir -p "$KCACHE"
  if [ "${IMGSVC_VM_REFRESH:-0}" != 1 ] && [ -f "$KCACHE/current" ]; then
    ver=$(cat "$KCACHE/current")
    if [ -f "$KCACHE/$ver/.complete" ]; then
      echo "$ver"
      return 0
    fi
  fi
  if [ "$KSUITE" = host ]; then
    pkg=$(apt_kernel_pkg)
    if [ -z "$pkg" ]; then
      bounded 300 apt-get update -q >&2 || die "apt-get update failed"
      pkg=$(apt_kernel_pkg)
    fi
  else
    apt_private_config
    bounded 300 "${APT_ENV[@]}" apt-get update -q >&2 \
      || die "apt-get update of suite $KSUITE failed (no such suite, no network, or its InRelease does not verify with $KEYRING: see apt's messages above; configuration in $KCACHE/apt)"
    pkg=$(apt_kernel_pkg)
  fi
  [ -n "$pkg" ] || die "could not resolve the kernel package that linux-image-amd64 ($KSUITE) depends on"
  ver=${pkg#linux-image-}
  local root=$KCACHE/$ver
  if [ ! -f "$root/.complete" ]; then
    mapfile -t pkgs < <(kernel_packages "$pkg" "$ver")
    [ ${#pkgs[@]} -gt 0 ] || die "could not resolve the packages of $pkg"
    note "downloading ${pkgs[*]} (apt-get download, $KSUITE)"
    local dl=$KCACHE/download.$$ deb t0=$SECONDS size
    rm -rf -- "$dl" "$root"
    mkdir -p "$dl"
    (cd "$dl" && bounded 600 "${APT_ENV[@]}" apt-get download -q -o APT::Sandbox::User=root "${pkgs[@]}" >&2) \
      || { rm -rf -- "$dl"; die "apt-get download ${pkgs[*]} failed"; }
    size=$(du -cm "$dl"/*.deb | tail -n1 | cut -f1)
    mkdir -p "$root"
    for deb in "$dl"/*.deb; do
      bounded 300 dpkg-deb -x "$deb" "$root" || { rm -rf -- "$dl"; die "dpkg-deb -x $(basename "$deb") failed"; }
    done
    rm -rf -- "$dl"
    normalize_kernel_tree "$root" "$ver"
    local moddir=$root/lib/modules/$ver
    [ -f "$root/boot/vmlinuz-$ver" ] && [ -f "$root/boot/config-$ver" ] && [ -d "$moddir" ] \
      || die "${pkgs[*]} do not contain boot/vmlinuz-$ver, boot/config-$ver and lib/modules/$ver"
    compgen -G "$moddir/kernel/net/tls/tls.ko*" >/dev/null \
      || die "$pkg has no tls module (lib/modules/$ver/kernel/net/tls/tls.ko*)"
    # busybox (depmod, and modprobe/insmod in the VM) reads .ko.xz and .ko.gz
    # but not .ko.zst
    if [ -n "$(find "$moddir" -name '*.ko.zst' -print -quit)" ]; then
      decompress_modules "$moddir" zst
    fi
    # the packages ship no modules.dep (their postinst runs depmod)
    bounded 300 "$BUSYBOX" depmod -b "$root" "$ver" >&2 || die "depmod failed"
    if ! grep -Eq '^kernel/fs/9p/9p\.ko[.a-z]*: .*/9pnet\.ko' "$moddir/modules.dep"; then
      # busybox could not read compressed modules: decompress them all
      local ext
      for ext in xz gz; do
        [ -z "$(find "$moddir" -name "*.ko.$ext" -print -quit)" ] || decompress_modules "$moddir" "$ext"
      done
      bounded 300 "$BUSYBOX" depmod -b "$root" "$ver" >&2 || die "depmod failed"
      grep -Eq '^kernel/fs/9p/9p\.ko: .*/9pnet\.ko' "$moddir/modules.dep" \
        || die "depmod found no dependencies in $moddir (9p -> 9pnet)"
    fi
    touch "$root/.complete"
    note "kernel $ver ready: ${size} MB of packages, $((SECONDS - t0)) s to download and unpack"
  fi
  echo "$ver" >"$KCACHE/current.tmp" && mv "$KCACHE/current.tmp" "$KCACHE/current"
  # keep only the current kernel of this suite in the cache
  local old
  for old in "$KCACHE"/*/; do
    old=$(basename "$old")
    [ "$old" = "$ver" ] || [ "$old" = apt ] && continue
    note "removing the superseded kernel $old from the cache"
    rm -rf -- "${KCACHE:?}/$old" "$IMG_DIR/initramfs-$old.cpio.gz" "$IMG_DIR/initramfs-$old.cpio.gz.stamp"
  done
  echo "$ver"
}

# u FILE OFFSET BYTES: the little-endian unsigned integer there
u() { od -An -t"u$3" -j "$2" -N"$3" "$1" | tr -d ' '; }

# QEMU boots an uncompressed ELF vmlinux through its PVH entry point, which
# skips the real-mode setup and the decompressor (seconds under TCG). Extract
# it from the bzImage once (the payload the header points at: xz for 6.1,
# zstd for newer Debian kernels); without it the bzImage is booted.
ensure_vmlinux() {
  local d=$1 ver=$2 k magic ss off len start ext tool
  k=$d/boot/vmlinuz-$ver
  [ -f "$d/vmlinux" ] || [ -f "$d/.no-vmlinux" ] && return 0
  # boot protocol >= 2.08: setup_sects at 0x1f1, payload_offset and
  # payload_length at 0x248 and 0x24c (the payload ends with its uncompressed size)
  # ("HdrS" at 0x202 is 0x53726448)
  if grep -q '^CONFIG_PVH=y' "$d/boot/config-$ver" && [ "$(u "$k" 514 4)" = 1400005704 ] \
    && [ "$(u "$k" 518 2)" -ge 520 ]; then
    ss=$(u "$k" 497 1)
    [ "$ss" -eq 0 ] && ss=4
    off=$(u "$k" 584 4)
    len=$(u "$k" 588 4)
    start=$(( (ss + 1) * 512 + off ))
    magic=$(od -An -tx1 -j "$start" -N6 "$k" | tr -d ' \n')
    case $magic in
      fd377a585a00) ext=xz ;;
      28b52ffd*) ext=zst ;;
      1f8b*) ext=gz ;;
      *) ext= ;;
    esac
    if [ -n "$ext" ] && tool=$(decompressor "$ext") \
      && dd if="$k" bs=64K iflag=skip_bytes,count_bytes skip="$start" count=$((len - 4)) status=none \
        | bounded 120 "$tool" -dc >"$d/vmlinux.tmp" 2>/dev/null \
      && [ "$(head -c4 "$d/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] \
      && [ "$(stat -c %s "$d/vmlinux.tmp")" = "$(u "$k" $((start + len - 4)) 4)" ]; then
      mv "$d/vmlinux.tmp" "$d/vmlinux"
      return 0
    fi
  fi
  rm -f -- "$d/vmlinux.tmp"
  note "could not extract an uncompressed vmlinux; booting the bzImage (slower)"
  touch "$d/.no-vmlinux"
}

# Modules needed before the host root is mounted, in load order; their
# dependencies (virtio, virtio_ring, 9pnet, netfs...) come with them.
BOOT_MODULES="virtio_pci 9pnet_virtio 9p overlay tls"

# Print the .ko paths (relative to the module dir) for the given modules and
# their dependencies, dependencies first, each once; built-in ones (in
# modules.builtin: virtio_pci from Debian 13's kernels on) are skipped.
module_closure() {
  local moddir=$1 builtin=/dev/null
  shift
  [ -f "$moddir/modules.builtin" ] && builtin=$moddir/modules.builtin
  awk -v want="$*" -v builtin="$builtin" '
    function norm(s) { gsub("-", "_", s); return s }
    function base(p,  b) { b = p; sub(".*/", "", b); sub("\\.ko(\\.[a-z]+)?$", "", b); return norm(b) }
    function visit(p,  n, i, d) {
      if (p in seen) return
      seen[p] = 1
      n = split(deps[p], d, " ")
      for (i = n; i >= 1; i--) visit(d[i])
      print p
    }
    FILENAME == builtin { isbuiltin[base($1)] = 1; next }
    {
      p = $1; sub(":$", "", p)
      deps[p] = ""
      for (i = 2; i <= NF; i++) deps[p] = deps[p] " " $i
      bypath[base(p)] = p
    }
    END {
      n = split(want, w, " ")
      for (i = 1; i <= n; i++) {
        m = norm(w[i])
        if (!(m in bypath) && (m in isbuiltin)) continue
        if (!(m in bypath)) { print "missing module " m > "/dev/stderr"; exit 1 }
        visit(bypath[m])
      }
    }' "$builtin" "$moddir/modules.dep"
}

ensure_initramfs() {
  local ver=$1 root=$KCACHE/$1 img=$IMG_DIR/initramfs-$1.cpio.gz want
  want=$(cat "$SCRIPT_PATH" "$BUSYBOX" | sha256sum | cut -d' ' -f1)
  if [ -f "$img" ] && [ "$(cat "$img.stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  note "building initramfs for $ver"
  local tmp moddir=$root/lib/modules/$ver ko dst ext tool
  INITRAMFS_TMP=$(mktemp -d "$VM_HOME/initramfs.XXXXXX")
  tmp=$INITRAMFS_TMP
  mkdir -p "$tmp"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,etc,ctl,mnt/lower,mnt/rw,mnt/root,lib/modules/"$ver"}
  cp "$BUSYBOX" "$tmp/bin/busybox"
  # shellcheck disable=SC2086
  module_closure "$moddir" $BOOT_MODULES >"$tmp/boot-modules" || die "resolving boot modules failed"
  # compressed modules (.ko.xz from Debian 13's kernels on) go in uncompressed:
  # the initramfs is compressed anyway, and the guest's busybox need not unpack them
  while IFS= read -r ko; do
    dst=$tmp/lib/modules/$ver/${ko%.ko*}.ko
    mkdir -p "$(dirname "$dst")"
    case $ko in
      *.ko) cp "$moddir/$ko" "$dst" ;;
      *) ext=${ko##*.ko.}
        tool=$(decompressor "$ext") || die "no decompressor for the module $ko"
        "$tool" -dc "$moddir/$ko" >"$dst" || die "decompressing $ko failed" ;;
    esac
    echo "${ko%.ko*}.ko" >>"$tmp/etc/boot-modules"
  done <"$tmp/boot-modules"
  rm -f -- "$tmp/boot-modules"
  write_init >"$tmp/init"
  chmod 755 "$tmp/init"
  (cd "$tmp" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1 >"$img.tmp") \
    || die "building the initramfs failed"
  mv "$img.tmp" "$img"
  echo "$want" >"$img.stamp"
  rm -rf -- "$tmp"
  INITRAMFS_TMP=
}

# The initramfs /init (busybox ash). Run-specific settings come from the
# runctl share (/ctl/config).
write_init() {
  cat <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
fail() {
  echo "vm-init: error: $*"
  [ -d /ctl/. ] && echo "$*" >/ctl/init-error 2>/dev/null
  sync
  poweroff -f
  sleep 10
  exit 1
}
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
case " $(cat /proc/cmdline) " in
  *" imgsvc.trace "*) trace() { echo "vm-init: $(cut -d' ' -f1 /proc/uptime)s $*"; } ;;
  *) trace() { :; } ;;
esac
trace "init started"
stty -onlcr 2>/dev/null
ver=$(uname -r)
while read -r ko; do
  insmod "/lib/modules/$ver/$ko" || fail "insmod $ko"
done </etc/boot-modules
trace "boot modules loaded"

mount9p() { # tag dir options: the virtio device may probe asynchronously
  i=0
  while ! mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000$3" "$1" "$2" 2>/dev/null; do
    i=$((i + 1))
    [ $i -ge 100 ] && fail "cannot mount 9p share '$1'"
    sleep 0.05
  done
}
mount9p runctl /ctl ""
trace "runctl mounted"
. /ctl/config || fail "cannot read /ctl/config"
mount9p hostroot /mnt/lower ",ro,cache=loose"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw || fail "mount overlay tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /mnt/root \
  || fail "mount overlay root"
trace "root overlay mounted"

# the whole module tree (from the host cache) for the kernel's modprobe calls,
# which resolve in this initramfs, and for tools inside the VM
if [ -d "/mnt/lower$VM_MODSRC" ]; then
  mount --bind "/mnt/lower$VM_MODSRC" "/lib/modules/$ver" || fail "bind modules"
  mkdir -p "/mnt/root$VM_MODDST" && mount --bind "/mnt/lower$VM_MODSRC" "/mnt/root$VM_MODDST"
fi

R=/mnt/root
mount -t proc proc $R/proc || fail "mount $R/proc"
mount -t sysfs sysfs $R/sys || fail "mount $R/sys"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs devtmpfs $R/dev || fail "mount $R/dev"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
[ "$VM_FRESH_TMP" = 1 ] && { mount -t tmpfs -o mode=1777 tmpfs $R/tmp || fail "mount $R/tmp"; }
[ "$VM_FRESH_RUN" = 1 ] && { mount -t tmpfs -o mode=0755 tmpfs $R/run || fail "mount $R/run"; }
mkdir -p $R/run/imgsvc-vm && mount --bind /ctl $R/run/imgsvc-vm || fail "bind /run/imgsvc-vm"

trace "mounts done"
ip link set lo up || fail "ip link set lo up"
hostname imgsvc-vm
# extra modules asked for with IMGSVC_VM_MODULES; anything else (e.g. the
# gcm/ccm/chacha20poly1305 crypto that tls asks for) loads on demand
for m in $VM_MODULES; do
  modprobe "$m" || echo "vm-init: warning: modprobe $m failed"
done
trace "extra modules loaded"

echo "vm: kernel $ver, tcp_available_ulp: $(cat /proc/sys/net/ipv4/tcp_available_ulp)"
: >/ctl/started
chroot $R "$VM_BASH" /run/imgsvc-vm/cmd.sh </dev/null
echo $? >/ctl/status.tmp && mv /ctl/status.tmp /ctl/status
sync
# stop QEMU through its isa-debug-exit port (no "reboot: Power down" line on
# the console); power off if that did not work
printf '\000' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
poweroff -f
sleep 10
INIT
}

# Setup is shared between concurrent runs: serialise it.
exec 9>"$VM_HOME/lock"
lock_wait=$(remaining)
[ "$lock_wait" -gt 0 ] || lock_wait=1
flock -w "$lock_wait" 9 || die "timed out waiting for the setup lock $VM_HOME/lock"
ensure_packages
BUSYBOX=$(command -v busybox)
KVER=$(ensure_kernel)
ensure_vmlinux "$KCACHE/$KVER" "$KVER"
ensure_initramfs "$KVER"
flock -u 9
exec 9>&-
KERNEL=$KCACHE/$KVER/boot/vmlinuz-$KVER
[ -f "$KCACHE/$KVER/vmlinux" ] && KERNEL=$KCACHE/$KVER/vmlinux
INITRD=$IMG_DIR/initramfs-$KVER.cpio.gz

# --- per-run control directory ------------------------------------------------
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/imgsvc-vm.XXXXXX")
CWD=$(pwd -P)
under() { case $1/ in "$2"/*) return 0 ;; esac; return 1; }
fresh_tmp=1
fresh_run=1
under "$CWD" /tmp && fresh_tmp=0
under "$CWD" /run && fresh_run=0
{
  printf 'VM_MODSRC=%q\n' "$KCACHE/$KVER/lib/modules/$KVER"
  printf 'VM_MODDST=%q\n' "$(readlink -m "/lib/modules/$KVER")"
  printf 'VM_BASH=%q\n' "$BASH"
  printf 'VM_FRESH_TMP=%s\nVM_FRESH_RUN=%s\n' "$fresh_tmp" "$fresh_run"
  printf 'VM_MODULES=%q\n' "${IMGSVC_VM_MODULES:-}"
} >"$RUN_DIR/config"
{
  echo '# generated by tests/vm/run.sh'
  # shellcheck disable=SC2016
  echo 'for v in $(compgen -e); do unset "$v"; done'
  while IFS= read -r name; do
    case $name in
      PATH | HOME | USER | LOGNAME | LANG | LC_* | TZ | TERM | NO_COLOR | CLICOLOR | CLICOLOR_FORCE | IMGSVC_* | RUST_* | CARGO_*)
        printf 'export %s=%q\n' "$name" "${!name}" ;;
    esac
  done < <(compgen -e)
  printf 'ulimit -Hn %s 2>/dev/null; ulimit -Sn %s 2>/dev/null\n' "$(ulimit -Hn)" "$(ulimit -Sn)"
  printf 'cd -- %q || exit 125\n' "$CWD"
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$RUN_DIR/cmd.sh"

# --- boot ---------------------------------------------------------------------
T_LAUNCH=$(date +%s.%N)
QEMU_LIMIT=$(remaining)
if [ "$QEMU_LIMIT" -le 0 ]; then
  echo "$PROG: error: the ${TIMEOUT}s timeout expired during VM setup" >&2
  exit 124
fi
qemu_args=(
  -nodefaults -no-user-config
  -machine q35 "${accel_args[@]}" -smp "$CPUS" -m "$MEM"
  -no-reboot -display none -vga none -nic none
  -serial stdio
  -kernel "$KERNEL" -initrd "$INITRD"
  -append "console=ttyS0 quiet loglevel=3 panic=-1 8250.nr_uarts=1 i8042.noaux i8042.nokbd i8042.nopnp${IMGSVC_VM_TRACE:+ imgsvc.trace}"
  -fsdev "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"
  -device "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"
  -fsdev "local,id=runctl,path=$RUN_DIR,security_model=none"
  -device "virtio-9p-pci,fsdev=runctl,mount_tag=runctl"
  -device isa-debug-exit,iobase=0xf4,iosize=0x04
)
timeout -k 10 "$QEMU_LIMIT" qemu-system-x86_64 "${qemu_args[@]}" </dev/null &
QEMU_PID=$!
qrc=0
wait "$QEMU_PID" || qrc=$?
QEMU_PID=
T_END=$(date +%s.%N)

boot=unknown
if [ -f "$RUN_DIR/started" ]; then
  boot=$(awk -v a="$T_LAUNCH" -v b="$(stat -c %.9Y "$RUN_DIR/started")" 'BEGIN { printf "%.1f", b - a }')
fi
total=$(awk -v a="$T_START" -v b="$T_END" 'BEGIN { printf "%.1f", b - a }')

if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
  if [ "$boot" = unknown ]; then
    echo "$PROG: error: timed out after ${TIMEOUT}s before the command started (qemu killed)" >&2
  else
    echo "$PROG: error: timed out after ${TIMEOUT}s (qemu killed; the VM had booted in ${boot}s)" >&2
  fi
  exit 124
fi
if [ -f "$RUN_DIR/status" ]; then
  status=$(cat "$RUN_DIR/status")
  [[ $status =~ ^[0-9]+$ ]] || die "the VM wrote a malformed exit status '$status'"
  note "command exited with status $status (boot ${boot}s, total ${total}s)"
  exit "$status"
fi
if [ -f "$RUN_DIR/init-error" ]; then
  die "the VM failed to boot: $(cat "$RUN_DIR/init-error") (qemu exit status $qrc)"
fi
die "the VM stopped without reporting the command's exit status (qemu exit status $qrc; boot failure or guest crash, see the console output above)"
