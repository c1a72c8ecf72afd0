# Sourced by the CI steps that use containers: podman set up as it works on these machines,
# and a minimal Debian image made locally (no container registry can be reached).
#   podman_ready            install podman and its helpers when missing; 1 if it cannot run
#   base_image NAME PKGS    make localhost/NAME from debootstrap --variant=minbase with PKGS
# Both are safe to call again; the debootstrap tree is cached in $WACRM_CI_CACHE.

WACRM_CI_CACHE=${WACRM_CI_CACHE:-/var/cache/wacrm-ci}
SUITE=${WACRM_CI_SUITE:-bookworm}
# The host's CA bundle, for apt and pip inside containers and builds (read-only).
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

podman_ready() {
    if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 \
        || ! command -v debootstrap >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || { echo "ci: podman is missing and this is not root" >&2; return 1; }
        echo "ci: installing podman, runc and debootstrap from the distribution" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            podman runc debootstrap uidmap >/dev/null || return 1
    fi
    # crun fails here (cgroups in hybrid mode) and the default ulimits are refused.
    mkdir -p "$WACRM_CI_CACHE"
    export CONTAINERS_CONF="$WACRM_CI_CACHE/containers.conf"
    cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    podman info >/dev/null 2>&1 || { echo "ci: podman cannot run on this machine" >&2; return 1; }
}

base_image() {
    local name=$1 pkgs=$2 root
    if podman image exists "localhost/$name"; then
        return 0
    fi
    root="$WACRM_CI_CACHE/$name-rootfs"
    if [ ! -f "$root/.complete" ]; then
        echo "ci: making a $SUITE image ($pkgs) with debootstrap" >&2
        rm -rf "$root"
        debootstrap --variant=minbase --include="$pkgs" "$SUITE" "$root" \
            >"$WACRM_CI_CACHE/$name-debootstrap.log" 2>&1 \
            || { tail -20 "$WACRM_CI_CACHE/$name-debootstrap.log" >&2; return 1; }
        apt_clean "$root"
        touch "$root/.complete"
    fi
    tar -C "$root" --exclude=./.complete -c . | podman import -q - "localhost/$name" >/dev/null
}

# debootstrap leaves the package cache behind: the image needs none of it.
apt_clean() {
    rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages
}
