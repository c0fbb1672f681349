#!/usr/bin/env bash
# A Linux guest on `rewind serve`: boot 1 formats ext4 and writes batch A; the host adds marker
# "after-a"; boot 2 finds A intact and writes batch B; the host recovers to "after-a"; boot 3,
# on the recovered image, finds exactly batch A and no trace of B. Every boot checks file
# contents against checksums computed on the host.
set -euo pipefail
cd "$(dirname "$0")/.."
source guest-tests/lib.sh

REWIND=${REWIND:-target/debug/rewind}
work=$(mktemp -d)
daemon=
cleanup() {
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

serve() { # serve IMAGE: starts rewind serve on $work/vhost.sock
    RUST_LOG=${RUST_LOG:-warn} "$REWIND" serve "$1" --socket "$work/vhost.sock" --num-queues 2 --size 128M \
        2>> "$work/daemon.log" &
    daemon=$!
    wait_for_socket "$work/vhost.sock" "$daemon"
}
stop() {
    kill -TERM "$daemon"
    wait "$daemon" || { echo "rewind serve did not exit cleanly" >&2; cat "$work/daemon.log" >&2; return 1; }
    daemon=
}
boot() { # boot NAME SCRIPT: runs the script in a guest on the served disk
    echo "== guest boot: $1"
    if ! guest_boot "$work/$1.log" "$2" "$work/data" \
        -chardev socket,id=disk0,path="$work/vhost.sock" \
        -device vhost-user-blk-pci,chardev=disk0,num-queues=2; then
        echo "guest boot $1 failed; its console:" >&2
        cat "$work/$1.log" >&2
        return 1
    fi
}

# The files, made on the host so their checksums are known before any guest touches them.
mkdir -p "$work/data/a" "$work/data/b"
for i in 1 2 3 4 5; do
    head -c $((i * 150000 + 777)) /dev/urandom > "$work/data/a/file$i"
    head -c $((i * 90000 + 13)) /dev/urandom > "$work/data/b/file$i"
done
(cd "$work/data" && sha256sum a/* > a.sha256 && sha256sum b/* > b.sha256)

cat > "$work/boot1.sh" <<'S'
set -e
mkfs.ext4 -q /dev/vda
mount /dev/vda /mnt
mkdir /mnt/a
cp /data/a/* /mnt/a/
sync
cd /mnt && sha256sum -c /data/a.sha256
cd / && umount /mnt
S
cat > "$work/boot2.sh" <<'S'
set -e
mount /dev/vda /mnt
cd /mnt && sha256sum -c /data/a.sha256
mkdir /mnt/b
cp /data/b/* /mnt/b/
sync
sha256sum -c /data/b.sha256
cd / && umount /mnt
S
cat > "$work/boot3.sh" <<'S'
set -e
mount /dev/vda /mnt
cd /mnt && sha256sum -c /data/a.sha256
test ! -e /mnt/b
echo "batch B is absent"
cd / && umount /mnt
S

serve "$work/disk.img"
boot "format-and-write-a" "$work/boot1.sh"
stop
"$REWIND" marker add "$work/disk.img" after-a --note "batch A written"
serve "$work/disk.img"
boot "check-a-write-b" "$work/boot2.sh"
stop
"$REWIND" verify "$work/disk.img"
"$REWIND" recover "$work/disk.img" --marker after-a --output "$work/recovered.img"
serve "$work/recovered.img"
boot "recovered-has-only-a" "$work/boot3.sh"
stop
echo "guest test ext4-recovery: 1 passed, 0 failed"
