# isolation.irqs on a real kernel: pre-start takes the VM's CPUs out of every IRQ's affinity
# (the kernel refuses some: IRQ 0, per-CPU and managed ones such as NVMe queues, reported and
# left alone) and out of the default affinity; two VMs compose, and stopping either one gives
# back exactly its CPUs; the last stop restores every byte.
# timeout: 200
. /lab/guest/lib.sh

irq_profile() {
	profile "$1" "cpus: $2
vcpus: sequential
isolation:
  irqs: true"
}

# check_irqs_off <cpus> <output of pvetune>: every IRQ either has no CPU of <cpus> in its
# affinity (the written one and the effective one the kernel chose) or is named as refused.
check_irqs_off() {
	local cpus=$1 out=$2 dir irq list eff bad=""
	for dir in /proc/irq/[0-9]*; do
		irq=${dir##*/}
		read -r list < $dir/smp_affinity_list
		read -r eff < $dir/effective_affinity_list 2> /dev/null
		if overlaps "$list" "$cpus" || overlaps "$eff" "$cpus"; then
			grep -q "IRQ $irq (E" "$out" || bad="$bad $irq($list/$eff)"
		fi
	done
	[ -z "$bad" ] && ok "every movable IRQ off $cpus" || fail "IRQs still on $cpus:$bad"
}

# irqs_of <snapshot>: its IRQ section (the default affinity and every IRQ's), the state this
# scenario changes. (systemd leaves qemu.slice behind after the first VM: not ours to compare.)
irqs_of() {
	sed -n '/^== irqs/,/^== workqueue/p' "$1" > "$1.irqs"
	echo "$1.irqs"
}

snapshot /tmp/irq-before
read -r default_before < /proc/irq/default_smp_affinity

# The errno a managed or per-CPU IRQ refuses a move with: EIO on 6.8, EPERM from 6.12 on
# (isolation-facts.md section 5; docs/kernel-facts.md, irq.refused).
case $(uname -r) in 6.8.*) refused=EIO ;; *) refused=EPERM ;; esac

# --- one VM ---------------------------------------------------------------------------------
vmid=140
vm_config $vmid
irq_profile $vmid 4-7
pvetune plan $vmid --phase pre-start > /tmp/irq-plan.out 2>&1
check_eq "plan exit" 0 $?
check_contains "plan shows the default affinity" /tmp/irq-plan.out "default_smp_affinity: $default_before -> 0f"
snapshot /tmp/irq-after-plan
check_same "plan changes nothing" /tmp/irq-before /tmp/irq-after-plan
pvetune $vmid pre-start > /tmp/irq-pre.out 2>&1
check_eq "pre-start exit" 0 $?
cat /tmp/irq-pre.out
check_contains "IRQ 0 is refused and reported" /tmp/irq-pre.out "IRQ 0 ($refused)"
check_eq "default IRQ affinity" 0f "$(val /proc/irq/default_smp_affinity)"
check_irqs_off 4-7 /tmp/irq-pre.out
vm_start $vmid || die "QEMU did not start"
check_rc "post-start" 0 pvetune -q $vmid post-start
pvetune status $vmid > /tmp/irq-status.out 2>&1
cat /tmp/irq-status.out
check_contains "status shows an IRQ's composed value" /tmp/irq-status.out "smp_affinity_list: 0-3 (original 0-7; CPUs 4-7 taken out)"
check_contains "status names the IRQs the kernel refused" /tmp/irq-status.out "refused by the kernel, left as they are: /proc/irq/0 ($refused)"
check_rc "post-stop" 0 pvetune $vmid post-stop
vm_stop $vmid || fail "QEMU did not stop"
snapshot /tmp/irq-after
check_same "post-stop restores every IRQ" $(irqs_of /tmp/irq-before) $(irqs_of /tmp/irq-after)

# --- two VMs, both stop orders ----------------------------------------------------------------
LAB_VM_SMP=2,sockets=1,cores=1,threads=2
vm_config 141
irq_profile 141 6-7
vm_config 142
irq_profile 142 4-5
for first in 141 142; do
	for v in 141 142; do
		pvetune $v pre-start > /tmp/irq-pre-$v.out 2>&1 || fail "pre-start $v: $(tail -n 3 /tmp/irq-pre-$v.out)"
		vm_start $v || die "QEMU $v did not start"
		check_rc "post-start $v" 0 pvetune -q $v post-start
	done
	cat /tmp/irq-pre-141.out /tmp/irq-pre-142.out > /tmp/irq-pre-both.out
	check_eq "default affinity, both VMs" 0f "$(val /proc/irq/default_smp_affinity)"
	check_irqs_off 4-7 /tmp/irq-pre-both.out
	if [ $first = 141 ]; then second=142 left=4-5 mask=cf; else second=141 left=6-7 mask=3f; fi
	check_rc "post-stop $first" 0 pvetune $first post-stop
	vm_stop $first || fail "QEMU $first did not stop"
	check_eq "default affinity after $first stopped" $mask "$(val /proc/irq/default_smp_affinity)"
	check_irqs_off $left /tmp/irq-pre-both.out
	# The CPUs $first gave back are usable for IRQs again: IRQ affinities that held them
	# before hold them again.
	back=0
	for dir in /proc/irq/[0-9]*; do
		read -r list < $dir/smp_affinity_list
		overlaps "$list" "$( [ $first = 141 ] && echo 6-7 || echo 4-5)" && back=$((back + 1))
	done
	[ $back -gt 0 ] && ok "$back IRQs have $first's CPUs back" || fail "no IRQ got $first's CPUs back"
	check_rc "post-stop $second" 0 pvetune $second post-stop
	vm_stop $second || fail "QEMU $second did not stop"
	snapshot /tmp/irq-after
	check_same "both VMs stopped ($first first): every IRQ as before" $(irqs_of /tmp/irq-before) $(irqs_of /tmp/irq-after)
done
finish
