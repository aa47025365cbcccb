#!/bin/sh
# Installs what the pvetune lab (tests/lab.rs) needs on a Debian 12 machine, as root.
# Idempotent: installs only the packages that are missing, and refreshes apt's lists only
# when it has to install something. (The guest kernels and busybox come through the lab's own
# private apt configuration under its cache, never through this machine's sources.)
set -eu

# busybox and the guest kernel are not installed: the lab fetches them with apt-get download.
packages="qemu-system-x86 debootstrap e2fsprogs xz-utils"

missing=""
for p in $packages; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done

if [ -n "$missing" ]; then
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
