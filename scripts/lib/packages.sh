# Sourced by the scripts that set up a fresh Debian machine.

# install_missing [APT-OPTION...] -- PACKAGE...: installs those of the packages that are not
# installed yet (one apt-get run; nothing when all are there).
install_missing() {
    local options=() missing=() package
    while [ "$1" != -- ]; do
        options+=("$1")
        shift
    done
    shift
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if ((${#missing[@]})); then
        echo "== installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${options[@]}" "${missing[@]}" >/dev/null
    fi
}

# The packages of a one-node Ceph cluster, which the replication tests and benchmarks start on
# 127.0.0.1 themselves (tests/common/ceph.rs); the packages start no daemon. Without
# recommends: ~250 MiB.
ceph_packages=(ceph-mon ceph-osd radosgw ceph-common)
