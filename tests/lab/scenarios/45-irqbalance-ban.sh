# isolation.irqbalance: ban with a real irqbalance (Debian's, started by hand: the unit is
# masked in the lab so that it cannot move the other scenarios' IRQs). pre-start tells it over
# its socket to keep off the VM's CPUs; after several of its rescans no movable IRQ is on them;
# post-stop gives the ban back (irqbalance's own detection again).
# flavours: systemd
# timeout: 240
. /lab/guest/lib.sh

vmid=145
vm_config $vmid
profile $vmid "cpus: 4-7
vcpus: sequential
isolation:
  irqs: true
  irqbalance: ban"

mkdir -p /run/irqbalance
# One rescan a second (the default is 10 s), so that a few seconds show what it does.
irqbalance --foreground --interval=1 > /tmp/ib.log 2>&1 &
ib=$!
for _ in $(seq 50); do [ -S /run/irqbalance/irqbalance$ib.sock ] && break; sleep 0.1; done
[ -S /run/irqbalance/irqbalance$ib.sock ] || { cat /tmp/ib.log; die "irqbalance made no socket"; }
note "irqbalance $(irqbalance --version 2>&1 | head -n 1)"

pvetune plan $vmid --phase pre-start > /tmp/ib-plan.out 2>&1
check_eq "plan exit" 0 $?
check_contains "plan shows the ban" /tmp/ib-plan.out "irqbalance ban (/run/irqbalance/irqbalance$ib.sock)"
pvetune $vmid pre-start > /tmp/ib-pre.out 2>&1
check_eq "pre-start exit" 0 $?
cat /tmp/ib-pre.out
vm_start $vmid || die "QEMU did not start"
check_rc "post-start" 0 pvetune -q $vmid post-start
sleep 4
pvetune status $vmid > /tmp/ib-status.out 2>&1
cat /tmp/ib-status.out
check_contains "status shows the ban" /tmp/ib-status.out "irqbalance bans 4-7"
# What irqbalance itself reports over its socket (`setup`: BANNED) is what pvetune set.
if grep -q "irqbalance bans.*changed outside" /tmp/ib-status.out; then
	fail "irqbalance reports another ban than pvetune set: $(grep 'irqbalance bans' /tmp/ib-status.out)"
else
	ok "irqbalance itself reports the ban"
fi
bad=""
for dir in /proc/irq/[0-9]*; do
	read -r list < $dir/smp_affinity_list
	overlaps "$list" 4-7 && ! grep -q "IRQ ${dir##*/} (E" /tmp/ib-pre.out && bad="$bad ${dir##*/}($list)"
done
check_eq "movable IRQs on the VM's CPUs after irqbalance's rescans" "" "$bad"

vm_stop $vmid || fail "QEMU did not stop"
check_rc "post-stop" 0 pvetune $vmid post-stop
pvetune status > /tmp/ib-after.out 2>&1
check_contains "nothing held after post-stop" /tmp/ib-after.out "holds nothing"
kill $ib 2> /dev/null
wait $ib 2> /dev/null
finish
