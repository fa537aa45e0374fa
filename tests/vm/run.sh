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
Environment: IMGSVC_VM_HOME (cache, default $HOME/.cache/imgsvc-vm),
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

ensure_packages() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
  # the static busybox goes into the initramfs
  { command -v busybox >/dev/null 2>&1 && dpkg -s busybox-static >/dev/null 2>&1; } || missing+=(busybox-static)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and apt-get is not available"
  note "installing ${missing[*]} (apt-get)"
  if ! bounded 600 env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
    bounded 300 apt-get update -q >&2 || die "apt-get update failed"
    bounded 600 env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
      || die "apt-get install ${missing[*]} failed"
  fi
  command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 still missing after install"
}

# Resolve, download and unpack the Debian kernel; prints its version.
ensure_kernel() {
  local kdir=$VM_HOME/kernel ver pkg
  mkdir -p "$kdir"
  if [ "${IMGSVC_VM_REFRESH:-0}" != 1 ] && [ -f "$kdir/current" ]; then
    ver=$(cat "$kdir/current")
    if [ -f "$kdir/$ver/.complete" ]; then
      echo "$ver"
      return 0
    fi
  fi
  pkg=$(apt_kernel_pkg)
  if [ -z "$pkg" ]; then
    bounded 300 apt-get update -q >&2 || die "apt-get update failed"
    pkg=$(apt_kernel_pkg)
  fi
  [ -n "$pkg" ] || die "could not resolve the kernel package that linux-image-amd64 depends on"
  ver=${pkg#linux-image-}
  if [ ! -f "$kdir/$ver/.complete" ]; then
    note "downloading $pkg (apt-get download)"
    local dl=$kdir/download.$$
    rm -rf -- "$dl" "$kdir/$ver"
    mkdir -p "$dl"
    (cd "$dl" && bounded 600 apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) \
      || { rm -rf -- "$dl"; die "apt-get download $pkg failed"; }
    mkdir -p "$kdir/$ver"
    bounded 300 dpkg-deb -x "$dl"/"$pkg"_*.deb "$kdir/$ver" || { rm -rf -- "$dl"; die "dpkg-deb -x failed"; }
    rm -rf -- "$dl"
    [ -f "$kdir/$ver/boot/vmlinuz-$ver" ] && [ -d "$kdir/$ver/lib/modules/$ver" ] \
      || die "$pkg does not contain boot/vmlinuz-$ver and lib/modules/$ver"
    # the package ships no modules.dep (its postinst runs depmod)
    bounded 300 "$BUSYBOX" depmod -b "$kdir/$ver" "$ver" >&2 || die "depmod failed"
    touch "$kdir/$ver/.complete"
  fi
  echo "$ver" >"$kdir/current.tmp" && mv "$kdir/current.tmp" "$kdir/current"
  # keep only the current kernel in the cache
  local old
  for old in "$kdir"/*/; do
    old=$(basename "$old")
    [ "$old" = "$ver" ] && continue
    note "removing the superseded kernel $old from the cache"
    rm -rf -- "${kdir:?}/$old" "$VM_HOME/initramfs-$old.cpio.gz" "$VM_HOME/initramfs-$old.cpio.gz.stamp"
  done
  echo "$ver"
}

# QEMU boots an uncompressed ELF vmlinux through its PVH entry point, which
# skips the real-mode setup and the decompressor (seconds under TCG). Extract
# it from the bzImage once; without it the bzImage is booted.
ensure_vmlinux() {
  local d=$VM_HOME/kernel/$1 off
  [ -f "$d/vmlinux" ] || [ -f "$d/.no-vmlinux" ] && return 0
  if grep -q '^CONFIG_PVH=y' "$d/boot/config-$1" && command -v xz >/dev/null 2>&1; then
    off=$(LC_ALL=C grep -m1 -obUaP '\xfd7zXZ\x00' "$d/boot/vmlinuz-$1" | cut -d: -f1 || true)
    # (xz stops reading at the end of the stream: no pipe, so no SIGPIPE for tail)
    if [ -n "$off" ] && xz -dc --single-stream <(tail -c +"$((off + 1))" "$d/boot/vmlinuz-$1") >"$d/vmlinux.tmp" 2>/dev/null \
      && [ "$(head -c4 "$d/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
      mv "$d/vmlinux.tmp" "$d/vmlinux"
      return 0
    fi
  fi
  rm -f -- "$d/vmlinux.tmp"
  note "could not extract an uncompressed vmlinux; booting the bzImage (slower)"
  touch "$d/.no-vmlinux"
}

apt_kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

# Modules needed before the host root is mounted, in load order.
BOOT_MODULES="virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
  netfs fscache 9pnet 9pnet_virtio 9p overlay tls"

# Print the .ko paths (relative to the module dir) for the given modules and
# their dependencies, dependencies first, each once.
module_closure() {
  local moddir=$1
  shift
  awk -v want="$*" '
    function norm(s) { gsub("-", "_", s); return s }
    function base(p,  b) { b = p; sub(".*/", "", b); sub("\\.ko(\\.[a-z]+)?$", "", b); return norm(b) }
    function visit(p,  n, i, d) {
      if (p in seen) return
      seen[p] = 1
      n = split(deps[p], d, " ")
      for (i = n; i >= 1; i--) visit(d[i])
      print p
    }
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
        if (!(m in bypath)) { print "missing module " m > "/dev/stderr"; exit 1 }
        visit(bypath[m])
      }
    }' "$moddir/modules.dep"
}

ensure_initramfs() {
  local ver=$1 root=$VM_HOME/kernel/$1 img=$VM_HOME/initramfs-$1.cpio.gz want
  want=$(cat "$SCRIPT_PATH" "$BUSYBOX" | sha256sum | cut -d' ' -f1)
  if [ -f "$img" ] && [ "$(cat "$img.stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  note "building initramfs for $ver"
  local tmp moddir=$root/lib/modules/$ver ko
  INITRAMFS_TMP=$(mktemp -d "$VM_HOME/initramfs.XXXXXX")
  tmp=$INITRAMFS_TMP
  mkdir -p "$tmp"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,etc,ctl,mnt/lower,mnt/rw,mnt/root,lib/modules/"$ver"}
  cp "$BUSYBOX" "$tmp/bin/busybox"
  # shellcheck disable=SC2086
  module_closure "$moddir" $BOOT_MODULES >"$tmp/etc/boot-modules" || die "resolving boot modules failed"
  while IFS= read -r ko; do
    mkdir -p "$tmp/lib/modules/$ver/$(dirname "$ko")"
    cp "$moddir/$ko" "$tmp/lib/modules/$ver/$ko"
  done <"$tmp/etc/boot-modules"
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
ensure_vmlinux "$KVER"
ensure_initramfs "$KVER"
flock -u 9
exec 9>&-
KERNEL=$VM_HOME/kernel/$KVER/boot/vmlinuz-$KVER
[ -f "$VM_HOME/kernel/$KVER/vmlinux" ] && KERNEL=$VM_HOME/kernel/$KVER/vmlinux
INITRD=$VM_HOME/initramfs-$KVER.cpio.gz

# --- per-run control directory ------------------------------------------------
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/imgsvc-vm.XXXXXX")
CWD=$(pwd -P)
under() { case $1/ in "$2"/*) return 0 ;; esac; return 1; }
fresh_tmp=1
fresh_run=1
under "$CWD" /tmp && fresh_tmp=0
under "$CWD" /run && fresh_run=0
{
  printf 'VM_MODSRC=%q\n' "$VM_HOME/kernel/$KVER/lib/modules/$KVER"
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
