#!/usr/bin/env bash
# Instant access: a guest formats ext4, writes batch A and powers off; the host adds marker
# "after-a". A second guest then writes on the live disk (batch B, then a stream of files) while
# the host exports "after-a" on a socket of its own and a third guest boots it: it finds exactly
# batch A and writes a file of its own. The host promotes the export into an image and removes
# it; a guest on the live disk finds A, B and the stream but not the export's file, and a guest
# on the promoted image finds A and the export's file but not B.
set -euo pipefail
cd "$(dirname "$0")/.."
source guest-tests/lib.sh

guest_test_daemons

serve() { # serve IMAGE NAME: rewind serve with a control socket, under $work/NAME.*
    RUST_LOG=${RUST_LOG:-warn} "$REWIND" serve "$1" --socket "$work/$2.vhost" --control "$work/$2.control" \
        --size 128M --num-queues 2 2>> "$work/daemon.log" &
    daemons+=($!)
    wait_for_socket "$work/$2.control" "$!"
}
disk() { # disk SOCKET: QEMU arguments for a vhost-user-blk disk on SOCKET
    echo -chardev socket,id=disk0,path="$1" -device vhost-user-blk-pci,chardev=disk0,num-queues=2
}
boot() { # boot LOG SCRIPT SOCKET
    echo "== guest boot: $1"
    # shellcheck disable=SC2046
    guest_boot "$work/$1.log" "$2" "$work/data" $(disk "$3") || { cat "$work/$1.log" >&2; return 1; }
}

file_sets "$work/data"

cat > "$work/write-a.sh" <<'S'
set -e
mkfs.ext4 -q /dev/vda
mount /dev/vda /mnt
mkdir /mnt/a && cp /data/a/* /mnt/a/ && sync
cd /mnt && sha256sum -c /data/a.sha256
cd / && umount /mnt
S
cat > "$work/live-writer.sh" <<'S'
set -e
mount /dev/vda /mnt
mkdir /mnt/b && cp /data/b/* /mnt/b/ && sync
mkdir -p /mnt/c
echo GUEST-WRITING
for i in $(seq 1 300); do
    dd if=/dev/urandom of=/mnt/c/f$i bs=64k count=4 2>/dev/null  # 75 MiB in all: the disk is 128 MiB
    sync
done
cd / && umount /mnt
S
cat > "$work/export-guest.sh" <<'S'
set -e
mount /dev/vda /mnt
cd /mnt && sha256sum -c /data/a.sha256
test ! -e /mnt/b && test ! -e /mnt/c
echo "the export holds exactly batch A"
echo "written on the export" > /mnt/export-wrote && sync
cd / && umount /mnt
S
cat > "$work/live-check.sh" <<'S'
set -e
mount /dev/vda /mnt
cd /mnt && sha256sum -c /data/a.sha256 && sha256sum -c /data/b.sha256
test -e /mnt/c/f300 && test ! -e /mnt/export-wrote
echo "the live disk has A, B and the stream, and nothing the export wrote"
cd / && umount /mnt
S
cat > "$work/promoted-check.sh" <<'S'
set -e
mount /dev/vda /mnt
cd /mnt && sha256sum -c /data/a.sha256
test ! -e /mnt/b && grep -q "written on the export" /mnt/export-wrote
echo "the promoted image is the export: A and its own file"
cd / && umount /mnt
S

serve "$work/disk.img" live
boot write-a "$work/write-a.sh" "$work/live.vhost"
"$REWIND" marker add after-a --control "$work/live.control"

echo "== guest boot: live-writer (background), exporting after-a meanwhile"
# shellcheck disable=SC2046
(guest_boot "$work/live-writer.log" "$work/live-writer.sh" "$work/data" $(disk "$work/live.vhost")) &
writer=$!
for _ in $(seq 1 6000); do grep -q GUEST-WRITING "$work/live-writer.log" 2>/dev/null && break; sleep 0.05; done
grep -q GUEST-WRITING "$work/live-writer.log" || { echo "the writing guest never started" >&2; cat "$work/live-writer.log" >&2; exit 1; }
"$REWIND" export add --control "$work/live.control" --marker after-a --socket "$work/export.vhost"
boot export-guest "$work/export-guest.sh" "$work/export.vhost"
if grep -q GUEST-RESULT "$work/live-writer.log"; then
    echo "note: the live writer finished before the export guest did" >&2
fi
"$REWIND" export list --control "$work/live.control"
"$REWIND" export promote export-1 --output "$work/promoted.img" --control "$work/live.control"
"$REWIND" export remove export-1 --control "$work/live.control"
wait "$writer" || { echo "the writing guest failed" >&2; cat "$work/live-writer.log" >&2; exit 1; }
boot live-check "$work/live-check.sh" "$work/live.vhost"

serve "$work/promoted.img" promoted
boot promoted-check "$work/promoted-check.sh" "$work/promoted.vhost"
echo "guest test export-boot: 1 passed, 0 failed"
