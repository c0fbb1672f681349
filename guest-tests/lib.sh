# Shared helpers for guest tests: a busybox initramfs with the virtio and ext4 modules of
# Debian's kernel, per-boot scripts appended as a second cpio archive, and a QEMU runner that
# uses KVM only where it really runs a guest (TCG otherwise).
# shellcheck shell=bash

GUEST_DIR=${GUEST_DIR:-$PWD/target/guest}
mkdir -p "$GUEST_DIR"

guest_kernel() {
    local kernel
    kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
    [ -n "$kernel" ] || { echo "no kernel in /boot (apt-get install linux-image-amd64)" >&2; return 1; }
    echo "$kernel"
}

# Debian's modules, in load order: virtio transport, the block and console drivers, ext4.
GUEST_MODULES=(
    kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
    kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko
    kernel/drivers/virtio/virtio_pci.ko kernel/drivers/block/virtio_blk.ko kernel/drivers/char/virtio_console.ko
    kernel/lib/crc16.ko kernel/crypto/crc32c_generic.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
    kernel/fs/ext4/ext4.ko
)

# Copies a dynamically linked program and the libraries it needs into the tree at $1.
copy_program() {
    local root=$1 program=$2 lib
    install -D "$program" "$root$program"
    for lib in $(ldd "$program" | grep -o '/[^ ]*'); do
        install -D "$lib" "$root$lib"
    done
}

# Builds (once per kernel) the base initramfs: busybox, mke2fs, the modules and /init.
guest_initramfs() {
    local kernel version out root module
    kernel=$(guest_kernel) || return 1
    version=${kernel#/boot/vmlinuz-}
    out=$GUEST_DIR/base-$version.cpio.gz
    if [ -s "$out" ]; then echo "$out"; return; fi
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,mnt,data,lib/modules}
    cp /bin/busybox "$root/bin/busybox"
    for applet in sh mount umount mkdir cp cat echo sha256sum sync poweroff insmod ls test rm dd sleep head basename \
        grep printf seq tr cut wc mknod sed find xargs; do
        ln -s busybox "$root/bin/$applet"
    done
    copy_program "$root" /usr/sbin/mke2fs
    ln -s mke2fs "$root/usr/sbin/mkfs.ext4"
    for module in "${GUEST_MODULES[@]}"; do
        cp "/lib/modules/$version/$module" "$root/lib/modules/"
    done
    cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console \
         crc16 crc32c_generic mbcache jbd2 ext4; do
    insmod /lib/modules/$m.ko || echo "insmod $m failed"
done
export PATH=/bin:/sbin:/usr/sbin
echo "GUEST-START"
if sh /test.sh; then echo "GUEST-RESULT-OK"; else echo "GUEST-RESULT-FAIL"; fi
sync
poweroff -f
INIT
    chmod +x "$root/init"
    # Without /dev/console the kernel gives /init no output.
    mknod "$root/dev/console" c 5 1
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.tmp"
    # The per-boot archive is appended after this one: it must start on a 4-byte boundary,
    # and the kernel skips the zero padding.
    truncate -s %512 "$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$root"
    echo "$out"
}

# KVM only where it actually runs a stock kernel: on hosts whose /dev/kvm is provided by
# kvm_pvm (no vmx/svm) it does not.
guest_accel() {
    if [ -w /dev/kvm ] && grep -qE 'vmx|svm' /proc/cpuinfo && ! grep -q '^kvm_pvm' /proc/modules; then
        echo "-accel kvm -cpu host"
    else
        echo "-accel tcg,thread=multi -cpu max"
    fi
}

# guest_boot LOG SCRIPT DATA_DIR QEMU_ARGS...: boots a guest that runs SCRIPT as /test.sh with
# DATA_DIR's files under /data, then powers off (or is stopped after GUEST_TIMEOUT seconds,
# default 300). QEMU names another QEMU binary to run. Succeeds if the script did.
guest_boot() {
    local log=$1 script=$2 data=$3; shift 3
    local base kernel extra initrd
    base=$(guest_initramfs) || return 1
    kernel=$(guest_kernel) || return 1
    extra=$(mktemp -d)
    install -m 755 "$script" "$extra/test.sh"
    if [ -n "$data" ]; then cp -r "$data" "$extra/data"; fi
    initrd=$(mktemp)
    { cat "$base"; (cd "$extra" && find . | cpio -o -H newc --quiet); } > "$initrd"
    # shellcheck disable=SC2046
    timeout "${GUEST_TIMEOUT:-300}" "${QEMU:-qemu-system-x86_64}" $(guest_accel) -m 512 -smp 2 \
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine pc,memory-backend=mem \
        -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 quiet panic=-1" \
        -nodefaults -display none -serial stdio -no-reboot "$@" > "$log" 2>&1 < /dev/null || true
    rm -rf "$extra" "$initrd"
    grep -q "GUEST-RESULT-OK" "$log"
}

# wait_for_socket PATH PID: until the daemon listens, or fail if it died.
wait_for_socket() {
    local path=$1 pid=$2 i
    for i in $(seq 1 3000); do
        [ -S "$path" ] && return 0
        kill -0 "$pid" 2>/dev/null || { echo "daemon $pid exited" >&2; return 1; }
        sleep 0.01
    done
    echo "no socket at $path" >&2
    return 1
}

# file_sets DIR: two sets of random files for a guest to write and check, DIR/a and DIR/b, with
# their checksums in DIR/a.sha256 and DIR/b.sha256.
file_sets() {
    local dir=$1 i
    mkdir -p "$dir/a" "$dir/b"
    for i in 1 2 3 4; do
        head -c $((i * 120000 + 5)) /dev/urandom > "$dir/a/file$i"
        head -c $((i * 80000 + 9)) /dev/urandom > "$dir/b/file$i"
    done
    (cd "$dir" && sha256sum a/* > a.sha256 && sha256sum b/* > b.sha256)
}

# guest_fio DATA_DIR: fio and every library it loads in DATA_DIR/fio and DATA_DIR/lib (installed
# on the host first if missing), for a guest to run as
# /data/lib/ld-linux-x86-64.so.2 --library-path /data/lib /data/fio.
guest_fio() {
    local data=$1 lib
    command -v fio >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }
    mkdir -p "$data/lib"
    cp /usr/bin/fio "$data/fio"
    for lib in $(ldd /usr/bin/fio | grep -o '/[^ ]*' | sort -u); do cp -L "$lib" "$data/lib/"; done
}

# guest_test_daemons: $REWIND, a work directory $work, and $daemons, the daemons a test starts;
# at exit the daemons are stopped and $work is removed.
guest_test_daemons() {
    REWIND=${REWIND:-target/debug/rewind}
    work=$(mktemp -d)
    daemons=()
    trap 'for pid in "${daemons[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done; rm -rf "$work"' EXIT
}
