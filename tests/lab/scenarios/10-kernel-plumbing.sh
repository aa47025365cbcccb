# The kernel interfaces the isolation, memory and device issues will drive work in this guest,
# and each change can be undone exactly: cpuset partitions, CPU hotplug, per-node hugepages,
# IRQ affinity, PCI remove and rescan. Later issues replace these raw writes with pvetune.
# timeout: 60
. /lab/guest/lib.sh

snapshot /tmp/before

# --- cgroup v2 cpuset partition -------------------------------------------------------------
cg=/sys/fs/cgroup
had_cpuset=0
grep -qw cpuset $cg/cgroup.subtree_control && had_cpuset=1
[ $had_cpuset = 1 ] || echo +cpuset > $cg/cgroup.subtree_control || die "cannot enable cpuset at the root"
mkdir $cg/lab-part || die "mkdir lab-part"
echo 6-7 > $cg/lab-part/cpuset.cpus || fail "cpuset.cpus=6-7 refused"
echo isolated > $cg/lab-part/cpuset.cpus.partition || fail "partition=isolated refused"
check_eq "partition state" isolated "$(cat $cg/lab-part/cpuset.cpus.partition)"
check_eq "root cpus.effective" 0-5 "$(cat $cg/cpuset.cpus.effective)"
check_eq "root cpus.isolated" 6-7 "$(cat $cg/cpuset.cpus.isolated)"
# /sys/devices/system/cpu/isolated lists only boot-time isolcpus= CPUs, never partitions.
note "sysfs cpu/isolated with an isolated partition: '$(cat /sys/devices/system/cpu/isolated)'"
# A partition below a member cgroup (as qemu.slice/<vmid>.scope is below qemu.slice) is
# invalid: what the kernel says about it, for the isolation issue.
mkdir $cg/lab-member && echo +cpuset > $cg/lab-member/cgroup.subtree_control && mkdir $cg/lab-member/vm.scope ||
	die "cannot make lab-member/vm.scope"
echo 2-3 > $cg/lab-member/vm.scope/cpuset.cpus
echo isolated > $cg/lab-member/vm.scope/cpuset.cpus.partition
note "isolated partition under a member cgroup reads: $(cat $cg/lab-member/vm.scope/cpuset.cpus.partition)"
rmdir $cg/lab-member/vm.scope $cg/lab-member
echo member > $cg/lab-part/cpuset.cpus.partition || fail "partition=member refused"
rmdir $cg/lab-part || fail "rmdir lab-part"
[ $had_cpuset = 1 ] || echo -cpuset > $cg/cgroup.subtree_control
check_eq "root cpus.effective after" 0-7 "$(cat $cg/cpuset.cpus.effective)"

# --- CPU hotplug ----------------------------------------------------------------------------
echo 0 > /sys/devices/system/cpu/cpu7/online || fail "cpu7 offline refused"
check_eq "online with cpu7 off" 0-6 "$(cat /sys/devices/system/cpu/online)"
echo 1 > /sys/devices/system/cpu/cpu7/online || fail "cpu7 online refused"

# --- hugepages per NUMA node ----------------------------------------------------------------
h1=/sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages
echo 4 > $h1 || fail "nr_hugepages on node1 refused"
check_eq "node1 2M pages" 4 "$(cat $h1)"
check_eq "node0 2M pages" 0 "$(cat /sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages)"
check_eq "vm.nr_hugepages" 4 "$(cat /proc/sys/vm/nr_hugepages)"
echo 0 > $h1
g1=/sys/devices/system/node/node1/hugepages/hugepages-1048576kB/nr_hugepages
[ -e $g1 ] && ok "1 GiB page size offered" || fail "no 1 GiB page size (pdpe1gb)"
# Whether one can be had at run time on a 2 GiB node is a fact for the memory issue.
echo 1 > $g1
got=$(cat $g1)
echo 1 > /proc/sys/vm/compact_memory
echo 1 > $g1
note "1 GiB pages on node1 at run time: $got before compaction, $(cat $g1) after"
echo 0 > $g1

# --- IRQ affinity ---------------------------------------------------------------------------
moved="" refused=""
for dir in /proc/irq/[0-9]*; do
	irq=${dir##*/}
	old=$(cat $dir/smp_affinity_list)
	if echo 1 > $dir/smp_affinity_list 2>/dev/null; then
		moved="$moved $irq"
		echo "$old" > $dir/smp_affinity_list || fail "IRQ $irq: cannot restore $old"
	else
		refused="$refused $irq"
	fi
done
note "IRQs that moved to CPU 1:$moved; refused:$refused"
[ -n "$moved" ] && ok "some IRQs accept an affinity" || fail "no IRQ accepted an affinity"
[ -n "$refused" ] && ok "some IRQs refuse an affinity ($refused)" || fail "no IRQ refused (the refusal path is untestable)"

# --- PCI remove and rescan ------------------------------------------------------------------
dev=0000:00:10.0
note "reset methods of $dev: $(cat /sys/bus/pci/devices/$dev/reset_method 2>&1)"
echo 1 > /sys/bus/pci/devices/$dev/remove || fail "remove $dev refused"
[ ! -e /sys/bus/pci/devices/$dev ] && ok "$dev removed" || fail "$dev still there"
echo 1 > /sys/bus/pci/rescan || fail "rescan refused"
[ -e /sys/bus/pci/devices/$dev ] && ok "$dev back after rescan" || fail "$dev missing after rescan"

snapshot /tmp/after
check_same "kernel state restored" /tmp/before /tmp/after
finish
