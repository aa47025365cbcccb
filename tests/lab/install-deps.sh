#!/bin/sh
# Installs what the pvetune lab (tests/lab.rs) needs on a Debian 12 machine, as root.
# Idempotent: installs only the packages that are missing, and refreshes apt's lists only
# when it has to install something or when it has none (the lab finds kernels through them).
set -eu

# busybox and the guest kernel are not installed: the lab fetches them with apt-get download.
packages="qemu-system-x86 debootstrap e2fsprogs xz-utils"

missing=""
for p in $packages; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done

if [ -n "$missing" ] || [ -z "$(ls /var/lib/apt/lists/*_Packages 2>/dev/null)" ]; then
	apt-get update -q
fi
if [ -n "$missing" ]; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
