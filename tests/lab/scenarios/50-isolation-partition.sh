# isolation.partition on a real kernel: post-start makes the VM's CPUs an isolated cpuset
# partition holding only its vCPU threads (layout: docs/design.md); the host's slices, another
# VM's scope, kthreads and unbound workqueues leave those CPUs by themselves; the partition
# survives daemon-reload and set-property (systemd); rollback of a running VM, two VMs stopped
# in both orders, a failure in the middle of the partition step, kill -9 at random points and
# a VM whose CPUs are cycled offline and online first all end with the kernel state from
# before, byte for byte.
# timeout: 420
. /lab/guest/lib.sh

cg=/sys/fs/cgroup
wq=/sys/devices/virtual/workqueue

part_profile() {
	profile "$1" "cpus: $2
vcpus: sequential
emulator: housekeeping
iothreads: housekeeping
isolation:
  partition: isolated
  kthreads: true"
}

vcpu_tids() {
	threads "$1" | while read -r tid cpus comm; do
		case "$comm" in "CPU "*/TCG) echo "$tid" ;; esac
	done
}

# sorted <words...>: one line, numerically sorted.
sorted() { printf '%s\n' "$@" | sort -n | tr '\n' ' '; }

# check_isolated <vmid> <cpus> <vcpu cpus...>: the partition valid, the vCPU threads alone in
# it on their CPUs, everything else of QEMU on housekeeping CPUs 0-3.
check_isolated() {
	local vmid=$1 cpus=$2 pid part
	shift 2
	part=$cg/qemu.slice/$vmid.scope/vcpus
	pid=$(vm_pid $vmid)
	check_eq "VM $vmid partition" isolated "$(val $part/cpuset.cpus.partition)"
	check_eq "VM $vmid partition CPUs" "$cpus" "$(val $part/cpuset.cpus.effective)"
	check_eq "VM $vmid: only its vCPU threads in the partition" \
		"$(sorted $(vcpu_tids $pid))" "$(sorted $(cat $part/cgroup.threads))"
	local i=0 cpu tid list comm bad=""
	for cpu in "$@"; do
		check_eq "VM $vmid vCPU $i affinity" "$cpu" "$(affinity_of "$pid" "CPU $i/TCG")"
		i=$((i + 1))
	done
	# Every other thread of QEMU (main loop, iothreads, workers) off every partition's CPUs.
	threads "$pid" > /tmp/part-threads
	while read -r tid list comm; do
		case "$comm" in "CPU "*/TCG) continue ;; esac
		overlaps "$list" "$(val $cg/cpuset.cpus.isolated)" && bad="$bad $tid($comm:$list)"
	done < /tmp/part-threads
	check_eq "VM $vmid: emulator threads on isolated CPUs" "" "$bad"
}

# busy_loops_stay_off <cpus>: a loop in system.slice (where this runner is) and one in another
# VM's scope never run on <cpus> (40 samples of the CPU each last ran on).
busy_loops_stay_off() {
	local cpus=$1 host_loop other_loop seen="" c on=no stat
	sh -c 'while :; do :; done' &
	host_loop=$!
	if [ "$LAB_FLAVOUR" = systemd ]; then
		systemd-run --quiet --scope --slice=qemu.slice --unit=159 sh -c 'while :; do :; done' &
		sleep 2
		read -r other_loop < $cg/qemu.slice/159.scope/cgroup.procs
	else
		mkdir $cg/qemu.slice/159.scope
		sh -c 'while :; do :; done' &
		other_loop=$!
		echo $other_loop > $cg/qemu.slice/159.scope/cgroup.procs
	fi
	for _ in $(seq 40); do
		for p in $host_loop $other_loop; do
			read -r stat < /proc/$p/stat
			set -- $stat
			shift 38
			seen="$seen $1"
		done
		sleep 0.05
	done
	kill $host_loop $other_loop 2> /dev/null
	wait $host_loop 2> /dev/null
	for c in $seen; do
		overlaps "$c" "$cpus" && on="yes (cpu $c)"
	done
	check_eq "busy loops in system.slice and another VM's scope on $cpus" no "$on"
	if [ "$LAB_FLAVOUR" = systemd ]; then
		systemctl stop 159.scope 2> /dev/null
	else
		for _ in $(seq 50); do rmdir $cg/qemu.slice/159.scope 2> /dev/null && break; sleep 0.1; done
	fi
}

# stop <vmid>: as Proxmox does it: QEMU exits (systemd removes its scope), then post-stop.
stop() {
	vm_stop $1 || fail "QEMU $1 did not stop"
	check_rc "post-stop $1" 0 pvetune $1 post-stop
	# What systemd does for the busybox flavour: the empty scope goes.
	[ "$LAB_FLAVOUR" = systemd ] || rmdir $cg/qemu.slice/$1.scope 2> /dev/null
	[ ! -d $cg/qemu.slice/$1.scope ] || fail "the scope of VM $1 is left behind"
}

# --- one VM ----------------------------------------------------------------------------------
vmid=150
vm_config $vmid
part_profile $vmid 4-7
# The host with no VM running, once qemu.slice exists: what is left after the last VM stops
# (systemd then also switches the slice's controllers off by itself, pvetune or not).
vm_start $vmid || die "QEMU did not start"
vm_stop $vmid || die "QEMU did not stop"
snapshot /tmp/part-idle
check_rc "check" 0 pvetune check $vmid
check_rc "pre-start" 0 pvetune -q $vmid pre-start
vm_start $vmid || die "QEMU did not start"
pid=$(vm_pid $vmid)
snapshot /tmp/part-base
snapshot /tmp/part-before $vmid
pvetune plan $vmid --phase post-start > /tmp/part-plan.out 2>&1
check_eq "plan exit" 0 $?
cat /tmp/part-plan.out
check_contains "plan shows the partition" /tmp/part-plan.out "vcpus/cpuset.cpus.partition: (empty) -> isolated"
check_contains "plan shows the cgroup it creates" /tmp/part-plan.out "vcpus: absent -> threaded"
snapshot /tmp/part-after-plan $vmid
check_same "plan changes nothing" /tmp/part-before /tmp/part-after-plan

pvetune $vmid post-start > /tmp/part-post.out 2>&1
check_eq "post-start exit" 0 $?
cat /tmp/part-post.out
check_contains "post-start verifies the kernel threads" /tmp/part-post.out "none of the movable ones on CPUs 4-7"
check_contains "post-start verifies the workqueues" /tmp/part-post.out "nothing written"
check_isolated $vmid 4-7 4 5 6 7
check_eq "root cpuset.cpus.isolated" 4-7 "$(val $cg/cpuset.cpus.isolated)"
check_eq "system.slice effective CPUs" 0-3 "$(val $cg/system.slice/cpuset.cpus.effective)"
check_eq "the scope's effective CPUs (emulator threads)" 0-3 "$(val $cg/qemu.slice/$vmid.scope/cpuset.cpus.effective)"
check_eq "unbound workqueue mask" 0f "$(val $wq/cpumask)"
while read -r key value; do [ "$key" = Cpus_allowed_list: ] && kthreadd=$value; done < /proc/2/status
check_eq "kthreadd's CPUs" 0-3 "$kthreadd"
busy_loops_stay_off 4-7
pvetune status $vmid > /tmp/part-status.out 2>&1
cat /tmp/part-status.out
check_contains "status shows the partition" /tmp/part-status.out "vcpus/cpuset.cpus.partition: isolated"

# Kernel 6.8 refuses to empty cpuset.cpus of a cgroup with tasks (ENOSPC), and pvetune writes
# cpuset.cpus there (every online CPU on qemu.slice and the scope). While QEMU runs, what is
# left of an undo is exactly those files, still holding every online CPU, and held in the
# ledger for a later run (docs/design.md, "deferred"); post-stop gives them back.
deferred_pattern="^/sys/fs/cgroup/qemu.slice\(/$vmid.scope\)\?/cpuset.cpus: "
case $(uname -r) in 6.8.*) defers=yes ;; *) defers=no ;; esac
# check_same_running <name> <before> <after>: check_same, except on 6.8 for the deferred files,
# which must hold the online CPUs or their value from before.
check_same_running() {
	if [ $defers = yes ]; then
		local online line
		online=$(val /sys/devices/system/cpu/online)
		grep "$deferred_pattern" "$3" | while read -r line; do
			case "$line" in *": $online" | *":" | *": ") ;; *) echo "$line" ;; esac
		done > /tmp/part-deferred-bad
		[ -s /tmp/part-deferred-bad ] && fail "$1: a deferred cpuset.cpus holds neither the online CPUs nor nothing: $(cat /tmp/part-deferred-bad)"
		grep -v "$deferred_pattern" "$2" > "$2.nodefer"
		grep -v "$deferred_pattern" "$3" > "$3.nodefer"
		check_same "$1 (6.8: but the cpuset.cpus it defers)" "$2.nodefer" "$3.nodefer"
	else
		check_same "$1" "$2" "$3"
	fi
}

# Rollback of the running VM: threads out of the partition first, every byte back.
check_rc "rollback while running" 0 pvetune rollback $vmid
snapshot /tmp/part-rolled $vmid
check_same_running "rollback of a running VM restores everything" /tmp/part-before /tmp/part-rolled
if [ $defers = yes ] && grep -q "^/sys/fs/cgroup/qemu.slice/cpuset.cpus: [0-9]" /tmp/part-rolled; then
	pvetune status > /tmp/part-deferred.out 2>&1
	cat /tmp/part-deferred.out
	check_contains "status lists the deferred cpuset.cpus" /tmp/part-deferred.out "qemu.slice/cpuset.cpus"
fi

# A failure in the middle of the partition: another cgroup in qemu.slice holds CPU 7 as
# exclusive, so the kernel refuses the VM scope's exclusive CPUs (after the controllers and
# qemu.slice's exclusive CPUs were already written). Everything must be undone.
try_write $cg/cgroup.subtree_control +cpuset > /dev/null
try_write $cg/qemu.slice/cgroup.subtree_control +cpuset > /dev/null
mkdir $cg/qemu.slice/lab-conflict
try_write $cg/qemu.slice/cpuset.cpus.exclusive 7 > /dev/null || fail "qemu.slice exclusive 7"
try_write $cg/qemu.slice/lab-conflict/cpuset.cpus.exclusive 7 > /dev/null || fail "conflict exclusive 7"
snapshot /tmp/part-conflict $vmid
pvetune $vmid post-start > /tmp/part-fail.out 2>&1
check_eq "post-start with a conflicting cgroup fails" 1 $?
cat /tmp/part-fail.out
check_contains "the failure names the refused write" /tmp/part-fail.out "cpuset.cpus.exclusive"
snapshot /tmp/part-conflict-after $vmid
check_same_running "the failed partition step is undone" /tmp/part-conflict /tmp/part-conflict-after
rmdir $cg/qemu.slice/lab-conflict
try_write $cg/qemu.slice/cpuset.cpus.exclusive "" > /dev/null
# Put the controllers back as systemd had them (the base snapshot has them).
grep -q "qemu.slice/cgroup.subtree_control: .*cpuset" /tmp/part-base ||
	try_write $cg/qemu.slice/cgroup.subtree_control -cpuset > /dev/null
grep -q "^/sys/fs/cgroup/./cgroup.subtree_control: .*cpuset" /tmp/part-base ||
	try_write $cg/cgroup.subtree_control -cpuset > /dev/null
snapshot /tmp/part-cleaned $vmid
check_same_running "the conflict is cleaned up again" /tmp/part-before /tmp/part-cleaned

# kill -9 at random points of post-start, then rollback: whatever was made is undone.
for delay in 0.01 0.03 0.06 0.1 0.2 0.4; do
	pvetune -q $vmid post-start > /dev/null 2>&1 &
	hook=$!
	sleep $delay
	kill -9 $hook 2> /dev/null
	wait $hook 2> /dev/null
	pvetune rollback $vmid > /tmp/part-kill.out 2>&1 || { cat /tmp/part-kill.out; fail "rollback after kill -9 at $delay s"; }
	snapshot /tmp/part-killed $vmid
	check_same_running "kill -9 after $delay s, then rollback" /tmp/part-before /tmp/part-killed
done

check_rc "post-start again" 0 pvetune -q $vmid post-start
check_isolated $vmid 4-7 4 5 6 7
stop $vmid
snapshot /tmp/part-after
check_same "post-stop after QEMU exited restores everything" /tmp/part-idle /tmp/part-after

# --- two VMs, both stop orders ----------------------------------------------------------------
LAB_VM_SMP=2,sockets=1,cores=1,threads=2
vm_config 151
part_profile 151 4-5
vm_config 152
part_profile 152 6-7
for first in 151 152; do
	for v in 151 152; do
		check_rc "pre-start $v" 0 pvetune -q $v pre-start
		vm_start $v || die "QEMU $v did not start"
		check_rc "post-start $v" 0 pvetune -q $v post-start
	done
	check_isolated 151 4-5 4 5
	check_isolated 152 6-7 6 7
	check_eq "qemu.slice exclusive CPUs, both VMs" 4-7 "$(val $cg/qemu.slice/cpuset.cpus.exclusive)"
	check_eq "root isolated CPUs, both VMs" 4-7 "$(val $cg/cpuset.cpus.isolated)"
	if [ $first = 151 ]; then second=152 left=6-7; else second=151 left=4-5; fi
	stop $first
	if [ $second = 151 ]; then check_isolated 151 4-5 4 5; else check_isolated 152 6-7 6 7; fi
	check_eq "qemu.slice exclusive CPUs after $first stopped" $left "$(val $cg/qemu.slice/cpuset.cpus.exclusive)"
	check_eq "root isolated CPUs after $first stopped" $left "$(val $cg/cpuset.cpus.isolated)"
	stop $second
	snapshot /tmp/part-after
	check_same "both VMs stopped ($first first): everything as before" /tmp/part-idle /tmp/part-after
done

# --- cpu-cycle: the VM's CPUs offline and online again before the partition ----------------
LAB_VM_SMP=4,sockets=1,cores=2,threads=2
vmid=153
vm_config $vmid
profile $vmid "cpus: 4-7
vcpus: sequential
isolation:
  irqs: true
  partition: isolated
  cpu-cycle: true"
pvetune $vmid pre-start > /tmp/part-cycle-pre.out 2>&1
check_eq "pre-start $vmid (cpu-cycle) exit" 0 $?
vm_start $vmid || die "QEMU did not start"
check_rc "post-start $vmid (cpu-cycle)" 0 pvetune -q $vmid post-start
check_eq "every CPU online after the cycle" 0-7 "$(val /sys/devices/system/cpu/online)"
check_isolated $vmid 4-7 4 5 6 7
bad=""
for dir in /proc/irq/[0-9]*; do
	read -r list < $dir/smp_affinity_list
	# IRQs the kernel refuses to move (IRQ 0, per-CPU ones) are named in pre-start's summary.
	overlaps "$list" 4-7 && ! grep -q "IRQ ${dir##*/} (E" /tmp/part-cycle-pre.out &&
		bad="$bad ${dir##*/}($list)"
done
check_eq "movable IRQs on the VM's CPUs after the cycle" "" "$bad"
stop $vmid
snapshot /tmp/part-after
check_same "cpu-cycle VM stopped: everything as before" /tmp/part-idle /tmp/part-after

# --- what systemd does all day on a Proxmox host -------------------------------------------
# Last, and compared with nothing after: set-property CPUWeight makes systemd switch the cpu
# controller on in qemu.slice and the root by itself, which no rollback is to undo.
if [ "$LAB_FLAVOUR" = systemd ]; then
	LAB_VM_SMP=4,sockets=1,cores=2,threads=2
	check_rc "pre-start $vmid" 0 pvetune -q $vmid pre-start
	vm_start $vmid || die "QEMU did not start"
	check_rc "post-start $vmid" 0 pvetune -q $vmid post-start
	systemctl daemon-reload || fail "daemon-reload failed"
	sleep 1
	check_isolated $vmid 4-7 4 5 6 7
	# What Proxmox does when cpuunits or cpulimit change on a running VM.
	systemctl set-property --runtime $vmid.scope CPUWeight=50 || fail "set-property CPUWeight"
	sleep 1
	check_isolated $vmid 4-7 4 5 6 7
	systemd-run --quiet --scope --slice=qemu.slice --unit=158 sleep 600 &
	sleep 2
	systemctl set-property --runtime 158.scope AllowedCPUs=0-1 || fail "set-property AllowedCPUs"
	sleep 1
	check_isolated $vmid 4-7 4 5 6 7
	systemctl stop 158.scope 2> /dev/null
	stop $vmid
	check_eq "no partition left" "(empty)" "$(val $cg/cpuset.cpus.isolated)"
fi
finish
