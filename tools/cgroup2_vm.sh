#!/usr/bin/env bash
# Run a command against REAL cgroup v2, in a throwaway software-emulated VM.
#
#   tools/cgroup2_vm.sh [--] COMMAND [ARGS...]
#
# Why: our machines (dev and CI) have cgroup v1 controllers plus a unified hierarchy with no v2
# controllers, and no KVM. To test the v2 code paths for real, this boots Debian 12's own kernel
# under QEMU/TCG with a pure cgroup2 /sys/fs/cgroup (cpu memory io pids ...), shares the host's
# root file system into the guest read-only over 9p, chroots into it and runs COMMAND there as
# root, in the same working directory. So the host's own Python and .venv run inside the VM.
#
# What it does (after the measured recipe in the shared CGROUPS.md, "Testing real cgroup v2 here"):
#   1. installs qemu-system-x86, busybox-static, e2fsprogs and xz-utils if missing (apt-get);
#   2. once, into the cache dir: downloads the Debian kernel package that linux-image-amd64
#      depends on (apt-get download, never installed), uncompresses its kernel, and builds an
#      initramfs of static busybox plus the few modules needed (virtio, 9p, ext4, overlay);
#   3. boots the VM (2 vCPUs, 2 GiB) with a fresh 256 MiB ext4 virtio-blk scratch disk; the guest
#      side is tools/cgroup2_vm_init.sh, which mounts everything and runs COMMAND.
# COMMAND's stdout/stderr stream to ours (stdin is /dev/null) and we exit with its status.
# A cached run costs about 3.5 s on top of COMMAND, which runs several times slower than natively.
#
# In the guest: the root is an overlay (host / read-only + tmpfs), so writes succeed but are
# discarded; /tmp, /run, /dev/shm are fresh tmpfs (/tmp and /run stay the overlay's when the
# working directory is under them); the scratch disk (/dev/vda) is at /mnt/jobworker-disk;
# loopback networking only. COMMAND starts in the root cgroup (see JOBWORKER_VM_CGROUP).
# Environment: PATH, LANG/LC_*, TZ, CI, VIRTUAL_ENV, TERM (dumb unless stdout is a terminal) and
# JOBWORKER_* PYTEST_* PYTHON* PYENV_* HYPOTHESIS_* are passed on, plus HOME=/tmp TMPDIR=/tmp
# PYTHONDONTWRITEBYTECODE=1 JOBWORKER_IN_CGROUP2_VM=1 JOBWORKER_VM_DISK=/mnt/jobworker-disk.
#
# Settings (environment):
#   JOBWORKER_VM_CACHE    cache dir (default /var/cache/jobworker-cgroup2-vm); delete it to
#                         pick up a newer kernel
#   JOBWORKER_VM_TIMEOUT  seconds the VM may run before it is killed (default 900; exit 124)
#   JOBWORKER_VM_CGROUP   start COMMAND in this nested cgroup (e.g. /system.slice/jw.service),
#                         with cpu memory io pids enabled above it, like systemd's Delegate=yes;
#                         default: the root cgroup
#   JOBWORKER_VM_VERBOSE  1: also stream the guest console (boot log) to stderr
# Exit status: COMMAND's; 124 on timeout; 125 if the VM itself failed. Needs root.
set -euo pipefail

readonly PROG=cgroup2_vm
readonly CACHE=${JOBWORKER_VM_CACHE:-/var/cache/jobworker-cgroup2-vm}
readonly TIMEOUT=${JOBWORKER_VM_TIMEOUT:-900}
readonly VERBOSE=${JOBWORKER_VM_VERBOSE:-0}
readonly CGROUP=${JOBWORKER_VM_CGROUP:-}
readonly DISK_SIZE=256M
GUEST_INIT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/cgroup2_vm_init.sh
readonly GUEST_INIT
# Modules the guest loads (with their dependencies), unless built into the kernel.
# crc32c_generic: ext4/jbd2 need the crc32c algorithm (a soft dependency modinfo does not name).
readonly MODULES="virtio_pci virtio_blk 9pnet_virtio 9p crc32c_generic ext4 overlay"
# Bump to rebuild every cache entry when the way it is built changes.
readonly CACHE_FORMAT=2
# Stage 1 of the guest: baked into the cached initramfs. It hands over to the per-run
# $GUEST_INIT, which the host puts on the 9p share.
# shellcheck disable=SC2016 # guest code: expands in the guest
readonly STUB_INIT='#!/bin/sh
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "cgroup2_vm init: insmod $m failed"
done < /lib/modules/load-order
mkdir -p /share
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 jwshare /share &&
    [ -f /share/init.sh ]; then
    exec /bin/sh /share/init.sh
fi
echo "cgroup2_vm init: FATAL: cannot mount the run share (9p tag jwshare)"
poweroff -f'

log() { echo "$PROG: $*" >&2; }
die() {
    log "$*"
    exit 125
}

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

# --- Prerequisites ---------------------------------------------------------------------------

# apt-get update runs once, before the first apt command (stale or missing lists on a fresh
# machine would fail); cached runs never touch apt at all.
APT_UPDATED=0
apt_update() {
    local out
    if [[ $APT_UPDATED == 0 ]]; then
        out=$(apt-get update -q -o DPkg::Lock::Timeout=300 2>&1) ||
            die "apt-get update failed:"$'\n'"$out"
        APT_UPDATED=1
    fi
}

apt_get() {
    local out
    apt_update
    # Lock::Timeout: on a freshly booted machine, unattended-upgrades may hold the dpkg lock.
    out=$(DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
        -o APT::Sandbox::User=root "$@" 2>&1) || die "apt-get $* failed:"$'\n'"$out"
}

ensure_packages() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
        missing+=(busybox-static)
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    command -v xz >/dev/null || missing+=(xz-utils)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt_get install --no-install-recommends "${missing[@]}"
    fi
}

# Sets KERNEL and INITRD, building them into the cache first if needed. The cache entry's name
# carries a hash of how it was built, so editing STUB_INIT/MODULES/CACHE_FORMAT rebuilds it.
ensure_kernel() {
    local key entry
    key=$(printf '%s\n' "$CACHE_FORMAT" "$STUB_INIT" "$MODULES" | sha256sum | cut -c1-12)
    mkdir -p "$CACHE"
    exec 8>"$CACHE/.lock"
    flock 8 # concurrent runs: one builds, the others wait and reuse
    entry=$(find "$CACHE" -mindepth 1 -maxdepth 1 -type d -name "*-$key" | sort | tail -n 1)
    if [[ -z $entry || ! -f $entry/initrd.cpio || ! -f $entry/vmlinux ]]; then
        entry=$(build_kernel "$key")
    fi
    flock -u 8
    exec 8>&-
    KERNEL=$entry/vmlinux
    INITRD=$entry/initrd.cpio
}

# Prints the new cache entry's path. Runs in a subshell: its EXIT trap removes the work dir.
build_kernel() {
    local key=$1 pkg kver work moddir entry f m a
    apt_update
    pkg=$(apt-cache depends linux-image-amd64 |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1)
    [[ -n $pkg ]] || die "cannot tell which kernel package linux-image-amd64 depends on"
    kver=${pkg#linux-image-}
    log "building the VM kernel + initramfs ($pkg) in $CACHE"

    work=$(mktemp -d "$CACHE/.build.XXXXXX")
    # shellcheck disable=SC2064 # expand now: $work is local
    trap "rm -rf '$work'" EXIT
    (cd "$work" && apt_get download "$pkg")
    dpkg-deb -x "$work"/"$pkg"_*.deb "$work/pkg"
    moddir=$work/pkg/lib/modules/$kver
    [[ -d $moddir ]] || moddir=$work/pkg/usr/lib/modules/$kver
    [[ -d $moddir && -f $work/pkg/boot/vmlinuz-$kver ]] || die "unexpected layout in $pkg"

    # Module name -> file, and the modules built into this kernel.
    local -A path_of=() builtin=() seen=()
    while IFS= read -r -d '' f; do
        m=${f##*/}
        m=${m%.ko}
        path_of[${m//-/_}]=$f
    done < <(find "$moddir/kernel" -name '*.ko' -print0)
    while IFS= read -r f; do
        m=${f##*/}
        m=${m%.ko}
        builtin[${m//-/_}]=1
    done <"$moddir/modules.builtin"

    # Dependencies first (depth-first), each module once.
    local order=()
    add_module() {
        local m=$1 dep deps
        [[ -z ${seen[$m]:-} && -z ${builtin[$m]:-} ]] || return 0
        seen[$m]=1
        [[ -n ${path_of[$m]:-} ]] || die "kernel module $m not found in $pkg"
        deps=$(tr '\0' '\n' <"${path_of[$m]}" | sed -n 's/^depends=//p' | head -n 1)
        for dep in ${deps//,/ }; do
            add_module "$dep"
        done
        order+=("$m")
    }
    for m in $MODULES; do
        add_module "$m"
    done

    # The initramfs: static busybox (+ an applet link for each command), the modules, /init.
    local root=$work/initramfs
    mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    for a in $("$root/bin/busybox" --list); do
        [[ $a == busybox ]] || ln -s busybox "$root/bin/$a"
    done
    for m in "${order[@]}"; do
        cp "${path_of[$m]}" "$root/lib/modules/$m.ko"
    done
    printf '%s\n' "${order[@]}" >"$root/lib/modules/load-order"
    printf '%s\n' "$STUB_INIT" >"$root/init"
    chmod 755 "$root/init"
    mknod "$root/dev/console" c 5 1

    mkdir -p "$work/entry"
    (cd "$root" && find . | LC_ALL=C sort | /bin/busybox cpio -o -H newc 2>/dev/null) \
        >"$work/entry/initrd.cpio"
    extract_vmlinux "$work/pkg/boot/vmlinuz-$kver" "$work/entry/vmlinux"

    # Replace whatever the cache held before.
    entry=$CACHE/$kver-$key
    find "$CACHE" -mindepth 1 -maxdepth 1 -type d ! -name '.build.*' -exec rm -rf {} +
    mv "$work/entry" "$entry"
    log "modules: ${order[*]}"
    echo "$entry"
}

# The uncompressed kernel (an ELF with a PVH entry point) from the bzImage. QEMU boots it directly:
# no XZ decompression under emulation, which saves about 2.5 s per boot. Falls back to the
# bzImage itself (QEMU boots that too) if it is not XZ-compressed.
extract_vmlinux() {
    local bzimage=$1 out=$2 offset
    offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bzimage" | head -n 1 | cut -d: -f1) || true
    if [[ -n $offset ]] && tail -c +$((offset + 1)) "$bzimage" >"$out.xz" &&
        xz -dc --single-stream "$out.xz" >"$out" 2>/dev/null &&
        [[ $(head -c 4 "$out") == $'\x7fELF' ]]; then
        rm -f "$out.xz"
        return
    fi
    rm -f "$out.xz"
    log "cannot extract an uncompressed kernel; booting the bzImage"
    cp "$bzimage" "$out"
}

# --- The VM run -----------------------------------------------------------------------------

TMP=
QEMU_PID=
READER_PIDS=()

# Readers of the serial fifos exit when qemu closes them. If qemu never opened them they are
# still blocked in open(): opening the fifo ourselves (read-write never blocks) and closing it
# releases them with EOF.
stop_readers() {
    local name pid
    for name in con out err; do
        [[ -p $TMP/$name.out ]] && { exec 9<>"$TMP/$name.out" && exec 9>&-; } 2>/dev/null
    done
    for pid in "${READER_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    READER_PIDS=()
}

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    if [[ -n $QEMU_PID ]]; then
        kill -TERM "$QEMU_PID" 2>/dev/null || true # timeout(1) passes it on to qemu
        wait "$QEMU_PID" 2>/dev/null || true
        QEMU_PID=
    fi
    if [[ -n $TMP ]]; then
        stop_readers
        rm -rf "$TMP"
    fi
}

console_tail() {
    log "last lines of the guest console:"
    tail -n 40 "$TMP/console.log" 2>/dev/null | tr -d '\r' | sed 's/^/    /' >&2 || true
    if [[ -s $TMP/qemu.log ]]; then
        log "qemu said:"
        sed 's/^/    /' "$TMP/qemu.log" >&2
    fi
}

# run.sh: what the guest runs in the chroot (with bash). Quoted with %q, so any ARGS survive.
write_run_script() {
    local name term=dumb
    [[ -t 1 ]] && term=${TERM:-dumb}
    {
        echo '# Written by tools/cgroup2_vm.sh; run by bash in the guest chroot.'
        for name in $(compgen -e); do
            case $name in
                PATH | LANG | LC_* | TZ | CI | VIRTUAL_ENV | JOBWORKER_* | PYTEST_* | PYTHON* | \
                    PYENV_* | HYPOTHESIS_*)
                    printf 'export %s=%q\n' "$name" "${!name}"
                    ;;
            esac
        done
        printf 'export %s=%q\n' TERM "$term" HOME /tmp TMPDIR /tmp PYTHONDONTWRITEBYTECODE 1 \
            JOBWORKER_IN_CGROUP2_VM 1 JOBWORKER_VM_DISK /mnt/jobworker-disk
        printf 'cd -- %q || exit 125\n' "$PWD"
        printf 'exec'
        printf ' %q' "$@"
        printf '\n'
    } >"$TMP/share/run.sh"
}

run_vm() {
    local rc=0 status name
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/jobworker-cgroup2-vm.XXXXXX")
    [[ $TMP != *,* ]] || die "temp dir path contains a comma (qemu cannot take it): $TMP"
    mkdir "$TMP/share"
    cp "$GUEST_INIT" "$TMP/share/init.sh"
    printf 'JOBWORKER_VM_CGROUP=%s\n' "$CGROUP" >"$TMP/share/vm.conf"
    printf '%s\n' "$PWD" >"$TMP/share/cwd"
    write_run_script "$@"
    truncate -s "$DISK_SIZE" "$TMP/disk.img"
    mkfs.ext4 -q -F -L jobworker-disk "$TMP/disk.img" || die "mkfs.ext4 failed"

    # Serial lines come out through fifos: ttyS0 console -> log, ttyS1 -> stdout, ttyS2 -> stderr.
    for name in con out err; do
        mkfifo "$TMP/$name.in" "$TMP/$name.out"
    done
    if [[ $VERBOSE == 1 ]]; then
        tee "$TMP/console.log" <"$TMP/con.out" >&2 &
    else
        cat <"$TMP/con.out" >"$TMP/console.log" &
    fi
    READER_PIDS+=($!)
    cat <"$TMP/out.out" &
    READER_PIDS+=($!)
    cat <"$TMP/err.out" >&2 &
    READER_PIDS+=($!)

    # shellcheck disable=SC2054 # commas belong to qemu's option syntax
    local qemu=(
        # thread=single: both vCPUs take turns on one host thread. Multi-threaded TCG made
        # Python start 2-4x slower here (2 host cores, cross-vCPU syncing), and noisier.
        qemu-system-x86_64 -accel tcg,thread=single -cpu max -smp 2 -m 2048
        -nodefaults -no-user-config -display none -no-reboot
        -kernel "$KERNEL" -initrd "$INITRD"
        # tsc=reliable: TCG's TSC is the host clock, but the guest would mark it unstable and
        # fall back to slow HPET reads; no5lvl: -cpu max offers 5-level paging, which costs.
        -append "console=ttyS0 quiet panic=-1 cgroup_no_v1=all mitigations=off tsc=reliable no5lvl"
        -chardev "pipe,id=con,path=$TMP/con" -serial chardev:con
        -chardev "pipe,id=out,path=$TMP/out" -serial chardev:out
        -chardev "pipe,id=err,path=$TMP/err" -serial chardev:err
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
        -virtfs "local,path=$TMP/share,mount_tag=jwshare,security_model=none"
        -drive "file=$TMP/disk.img,if=none,id=disk,format=raw,cache=unsafe"
        -device virtio-blk-pci,drive=disk
    )
    # In the background so that our signal traps run at once (and kill it) while we wait.
    SECONDS=0
    timeout --kill-after=10 "$TIMEOUT" "${qemu[@]}" </dev/null >"$TMP/qemu.log" 2>&1 &
    QEMU_PID=$!
    wait "$QEMU_PID" || rc=$?
    QEMU_PID=
    stop_readers # all of the command's output is out before we exit

    if (((rc == 124 || rc == 137) && SECONDS >= TIMEOUT - 1)); then
        log "the VM ran longer than JOBWORKER_VM_TIMEOUT=$TIMEOUT s and was killed"
        console_tail
        exit 124
    fi
    status=$(cat "$TMP/share/status" 2>/dev/null || true)
    if [[ ! $status =~ ^[0-9]+$ ]]; then
        log "the VM stopped without reporting the command's exit status (qemu exit $rc)"
        console_tail
        exit 125
    fi
    exit "$status"
}

main() {
    case ${1:-} in
        -h | --help)
            usage
            exit 0
            ;;
        --) shift ;;
    esac
    (($#)) || {
        usage >&2
        exit 2
    }
    ((EUID == 0)) || die "must run as root (apt-get, mknod, the cache in /var/cache)"
    [[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "JOBWORKER_VM_TIMEOUT must be a number of seconds"
    [[ $CGROUP =~ ^(/[A-Za-z0-9._-]+)*$ ]] || die "JOBWORKER_VM_CGROUP must look like /a/b.service"
    [[ -f $GUEST_INIT ]] || die "missing $GUEST_INIT"

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    ensure_packages
    ensure_kernel
    run_vm "$@"
}

main "$@"
