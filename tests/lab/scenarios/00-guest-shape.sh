# The guest looks like a two-socket host: the facts every other scenario builds on.
# timeout: 30
. /lab/guest/lib.sh

cpu=/sys/devices/system/cpu
check_eq "online CPUs" 0-7 "$(cat $cpu/online)"
check_eq "SMT siblings of cpu0" 0-1 "$(cat $cpu/cpu0/topology/thread_siblings_list)"
check_eq "SMT siblings of cpu6" 6-7 "$(cat $cpu/cpu6/topology/thread_siblings_list)"
check_eq "package of cpu3" 0 "$(cat $cpu/cpu3/topology/physical_package_id)"
check_eq "package of cpu4" 1 "$(cat $cpu/cpu4/topology/physical_package_id)"
check_eq "L3 shared by cpu0" 0-3 "$(cat $cpu/cpu0/cache/index3/shared_cpu_list)"
check_eq "L3 shared by cpu5" 4-7 "$(cat $cpu/cpu5/cache/index3/shared_cpu_list)"
check_eq "CPUs of NUMA node 1" 4-7 "$(cat /sys/devices/system/node/node1/cpulist)"
mem1=$(awk '/MemTotal/ { print $4 }' /sys/devices/system/node/node1/meminfo)
[ "${mem1:-0}" -gt 500000 ] && ok "node 1 has memory ($mem1 kB)" || fail "node 1 memory: '$mem1' kB"
[ ! -e $cpu/cpu0/cpufreq ] && ok "no cpufreq (governors cannot be set here)" || fail "cpufreq exists"

# edu is vendor 1234 device 11e8: one at 00:10.0, a two-function one at 00:11.
for dev in 0000:00:10.0 0000:00:11.0 0000:00:11.1; do
	check_eq "PCI $dev" "0x1234 0x11e8" "$(cat /sys/bus/pci/devices/$dev/vendor) $(cat /sys/bus/pci/devices/$dev/device)"
done

check_eq "filesystem at /sys/fs/cgroup" cgroup2 "$(awk '$2 == "/sys/fs/cgroup" { print $3 }' /proc/mounts)"
# systemd makes qemu.slice only when the first VM's scope goes into it.
slices="init.scope system.slice"
[ "$LAB_FLAVOUR" = busybox ] && slices="$slices qemu.slice"
for c in $slices; do
	[ -d /sys/fs/cgroup/$c ] && ok "cgroup $c exists" || fail "cgroup $c missing"
done
[ -x /usr/local/bin/pvetune ] && ok "pvetune installed" || fail "no /usr/local/bin/pvetune"
finish
