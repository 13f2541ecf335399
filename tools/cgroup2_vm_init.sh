#!/bin/sh
# Guest side of tools/cgroup2_vm.sh: runs as PID 1 (busybox sh) inside the VM.
#
# The cached initramfs only loads the kernel modules, mounts the per-run 9p share at /share and
# execs this file from there, so changing this file needs no initramfs rebuild.
#
# It builds the root the command sees, then runs it:
#   /newroot            overlay: host / (read-only 9p "hostroot") + a tmpfs upper layer, so
#                       writes anywhere succeed but are thrown away with the VM
#   /proc /sys /dev /dev/pts /dev/shm /tmp /run      fresh guest instances (but /tmp or /run
#                       stays the overlay's if the working directory is under it)
#   /sys/fs/cgroup      cgroup2 only (the kernel is booted with cgroup_no_v1=all)
#   /mnt/jobworker-disk ext4 on the virtio-blk scratch disk (/dev/vda), for io.max tests
#   /run/jobworker-vm   the share: run.sh (written by the host) in, status out
# The command's stdout goes to ttyS1 and its stderr to ttyS2, which the host streams to its own
# stdout and stderr; ttyS0 is the console (kernel log and this script's messages).
# Its exit status is written to /share/status, then the VM powers off.

export PATH=/bin
SHARE=/share
NEW=/newroot
CG=$NEW/sys/fs/cgroup

say() { echo "cgroup2_vm init: $*"; }
fail() {
    say "FATAL: $*"
    sync
    poweroff -f
}

# Settings written by the host (JOBWORKER_VM_CGROUP), and its working directory.
# shellcheck source=/dev/null
[ -f "$SHARE/vm.conf" ] && . "$SHARE/vm.conf"
read -r cwd < "$SHARE/cwd"

# A fresh tmpfs at $1 (with mode $2), unless the command's working directory is under $1: the
# overlay's $1 is writable too, and keeps the host's content visible.
fresh_tmpfs() {
    case "$cwd/" in
        "$1"/*) say "keeping the host's $1: the working directory is under it" ;;
        *) mount -t tmpfs -o "mode=$2" tmpfs "$NEW$1" || fail "cannot mount a tmpfs at $1" ;;
    esac
}

# --- The root filesystem -------------------------------------------------------------------
mkdir -p /host /scratch "$NEW"
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose hostroot /host ||
    fail "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=755 scratch /scratch || fail "cannot mount the scratch tmpfs"
mkdir -p /scratch/upper /scratch/work
mount -t overlay -o lowerdir=/host,upperdir=/scratch/upper,workdir=/scratch/work overlay "$NEW" ||
    fail "cannot mount the overlay root"

mount -t proc proc "$NEW/proc" || fail "cannot mount proc"
mount -t sysfs sysfs "$NEW/sys" || fail "cannot mount sysfs"
# As systemd (Debian 12) mounts it.
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 "$CG" || fail "cannot mount cgroup2"
mount -t devtmpfs devtmpfs "$NEW/dev" || fail "cannot mount devtmpfs"
mkdir -p "$NEW/dev/pts" "$NEW/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$NEW/dev/pts" || fail "cannot mount devpts"
# What udev would add to /dev (bash's <(...) needs /dev/fd).
ln -sf /proc/self/fd "$NEW/dev/fd"
ln -sf /proc/self/fd/0 "$NEW/dev/stdin"
ln -sf /proc/self/fd/1 "$NEW/dev/stdout"
ln -sf /proc/self/fd/2 "$NEW/dev/stderr"
mount -t tmpfs -o mode=1777 shm "$NEW/dev/shm" || fail "cannot mount /dev/shm"
fresh_tmpfs /tmp 1777
fresh_tmpfs /run 755
mkdir -p "$NEW/run/jobworker-vm" "$NEW/mnt/jobworker-disk"
mount --bind "$SHARE" "$NEW/run/jobworker-vm" || fail "cannot bind the share"
mount -t ext4 /dev/vda "$NEW/mnt/jobworker-disk" || fail "cannot mount the scratch disk /dev/vda"
chmod 1777 "$NEW/mnt/jobworker-disk"

# Loopback networking (there is no other network), and a name.
ip link set lo up || fail "cannot bring up the loopback interface"
hostname cgroup2-vm

# --- cgroup v2 sanity ----------------------------------------------------------------------
read -r controllers < "$CG/cgroup.controllers"
for c in cpu memory io pids; do
    case " $controllers " in
        *" $c "*) ;;
        *) fail "cgroup2 controller '$c' missing (cgroup.controllers: $controllers)" ;;
    esac
done

# Optionally start the command in a nested cgroup, like a systemd service with Delegate=yes:
# controllers enabled in every ancestor, none in the leaf, which holds the command.
target=$CG
if [ -n "${JOBWORKER_VM_CGROUP:-}" ]; then
    for part in $(echo "$JOBWORKER_VM_CGROUP" | tr / ' '); do
        echo "+cpu +memory +io +pids" > "$target/cgroup.subtree_control" ||
            fail "cannot enable controllers in $target"
        target=$target/$part
        mkdir -p "$target" || fail "cannot create $target"
    done
fi

# --- Run the command -----------------------------------------------------------------------
# Raw serial lines: bytes pass through unchanged (no \n -> \r\n, no echo).
for tty in /dev/ttyS1 /dev/ttyS2; do
    stty -F "$tty" raw -echo clocal || fail "cannot set up $tty"
done

say "running the command"
# The inner sh joins the target cgroup and redirects before exec, so the command and all its
# children are in it (and our own messages, like "Killed", stay on the console).
# env -i: the command's environment comes only from run.sh.
rc=0
sh -c 'echo $$ > "$1/cgroup.procs" && shift &&
    exec "$@" </dev/null >/dev/ttyS1 2>/dev/ttyS2' sh "$target" \
    env -i chroot "$NEW" /bin/bash /run/jobworker-vm/run.sh || rc=$?
say "command exited with status $rc"
echo "$rc" > "$SHARE/status"

# Stop whatever the command left behind, let the serial lines drain (stty waits for that), and
# power off.
kill -KILL -1 2>/dev/null
sleep 0.2
stty -F /dev/ttyS1 raw 2>/dev/null
stty -F /dev/ttyS2 raw 2>/dev/null
umount "$NEW/mnt/jobworker-disk" 2>/dev/null
sync
poweroff -f
