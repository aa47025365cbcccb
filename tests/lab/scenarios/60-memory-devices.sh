# Memory and devices on a real kernel: compaction; per-node hugepage reservation on node 1; a
# shortfall refused before anything changes (preflight) and one the kernel makes (read back),
# both leaving the pool as it was; release after stop; two VMs reserving on one node released
# in both orders; KSM paused while a VM runs; remove-rescan of the single- and the
# multi-function edu device with every function back with its driver; the kernel's reset
# where the device has one; a device that is not there refused before anything changes.
# timeout: 360
. /lab/guest/lib.sh

node=/sys/devices/system/node
pool1=$node/node1/hugepages/hugepages-2048kB
pool0=$node/node0/hugepages/hugepages-2048kB
nr1() { local v; read -r v < $pool1/nr_hugepages; echo "$v"; }
nr0() { local v; read -r v < $pool0/nr_hugepages; echo "$v"; }
LAB_VM_SMP=2,sockets=1,cores=2,threads=1

# --- kernel facts pvetune relies on ----------------------------------------------------------
[ -e $node/node1/compact ] && ok "node1/compact exists" || fail "no $node/node1/compact"
check_eq "writing node1/compact" ok "$(try_write $node/node1/compact 1)"
check_eq "writing compact_memory" ok "$(try_write /proc/sys/vm/compact_memory 1)"
check_eq "writing drop_caches 1" ok "$(try_write /proc/sys/vm/drop_caches 1)"
[ -d /sys/kernel/mm/hugepages/hugepages-2048kB ] && ok "2 MiB pool exists" || fail "no 2 MiB pool"
base1=$(nr1) base0=$(nr0)
check_eq "node1 pool raised by 8" ok "$(try_write $pool1/nr_hugepages $((base1 + 8)))"
check_eq "node1 pool holds what was asked" $((base1 + 8)) "$(nr1)"
check_eq "node0 pool untouched by node1's write" "$base0" "$(nr0)"
read -r global < /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
check_eq "global pool = sum of the nodes" $((base1 + 8 + base0)) "$global"
check_eq "node1 pool lowered" ok "$(try_write $pool1/nr_hugepages "$base1")"
check_eq "node1 pool back" "$base1" "$(nr1)"
# More than the node has: the write succeeds and the kernel gives what it can.
check_eq "asking node1 for 4 GiB succeeds as a write" ok "$(try_write $pool1/nr_hugepages $((base1 + 2048)))"
got=$(nr1)
[ "$got" -lt $((base1 + 2048)) ] && ok "the kernel gave fewer ($got): only a read back tells" \
	|| fail "node1 gave all of 4 GiB ($got)"
try_write $pool1/nr_hugepages "$base1" > /dev/null
check_eq "node1 pool back after the shortfall" "$base1" "$(nr1)"

# systemd makes qemu.slice when the first VM's scope goes into it, and keeps it: one VM started
# and stopped first, so that the snapshots below compare what pvetune changes, not that.
vm_config 699
vm_start 699 || die "QEMU 699 did not start"
vm_stop 699 || die "QEMU 699 did not stop"

# --- compaction and reservation by pvetune ---------------------------------------------------
hp_conf() { # <vmid> <MiB on node 1>
	vm_config "$1" "numa: 1" "hugepages: 2" "numa0: cpus=0-1,hostnodes=1,memory=$2"
}
hp_profile() { # <vmid> <cpus> [extra yaml]
	profile "$1" "cpus: $2
hugepages:
  sync: true
  drop-caches: 1
  compact: nodes
  reserve: true
$3"
}
snapshot /tmp/hp-before
hp_conf 600 64
hp_profile 600 4-5 "ksm:
  pause: true"
check_rc "pre-start 600: compaction and 32 pages reserved" 0 pvetune 600 pre-start
check_eq "node1 pool while 600 starts" $((base1 + 32)) "$(nr1)"
check_eq "node0 pool untouched" "$base0" "$(nr0)"
[ -e /sys/kernel/mm/ksm/run ] && check_eq "KSM paused while 600 runs" 0 "$(val /sys/kernel/mm/ksm/run)"
vm_start 600 || die "QEMU 600 did not start"
check_rc "post-start 600" 0 pvetune -q 600 post-start
vm_stop 600 || fail "QEMU 600 did not stop"
check_rc "post-stop 600" 0 pvetune 600 post-stop
snapshot /tmp/hp-after
check_same "release after stop: pool and KSM as before" /tmp/hp-before /tmp/hp-after

# Two VMs on node 1 add up, and each stop gives back exactly its part, in both orders.
hp_conf 601 32
hp_profile 601 6-7
for order in "600 601" "601 600"; do
	check_rc "pre-start 600 ($order)" 0 pvetune 600 pre-start
	vm_start 600 || die "QEMU 600 did not start"
	pvetune -q 600 post-start || fail "post-start 600 ($order)"
	check_rc "pre-start 601 ($order)" 0 pvetune 601 pre-start
	vm_start 601 || die "QEMU 601 did not start"
	pvetune -q 601 post-start || fail "post-start 601 ($order)"
	check_eq "both reservations on node1 ($order)" $((base1 + 48)) "$(nr1)"
	set -- $order
	vm_stop "$1" && pvetune "$1" post-stop || fail "stop $1 ($order)"
	if [ "$1" = 600 ]; then left=16; else left=32; fi
	check_eq "after $1 stopped, $2's part stays ($order)" $((base1 + left)) "$(nr1)"
	vm_stop "$2" && pvetune "$2" post-stop || fail "stop $2 ($order)"
	check_eq "after both stopped ($order)" "$base1" "$(nr1)"
done

# A start that cannot succeed: refused by the preflight, before anything changes ...
hp_conf 602 4096
hp_profile 602 4-5
pvetune 602 pre-start > /tmp/short.out 2>&1
check_eq "preflight refuses 4 GiB on node 1: exit" 2 "$?"
cat /tmp/short.out
check_contains "the refusal names node, size and pages" /tmp/short.out "node 1: the VM needs 2048 pages of 2 MiB"
check_eq "node1 pool untouched by the refusal" "$base1" "$(nr1)"
# ... and one the kernel makes: the read back fails, the pool goes back as it was.
profile 602 'cpus: 4-5
hugepages:
  compact: nodes
  reserve: true
  preflight: warn'
pvetune 602 pre-start > /tmp/short.out 2>&1
check_eq "the kernel's shortfall fails pre-start: exit" 1 "$?"
cat /tmp/short.out
check_contains "the failure says what the kernel gave" /tmp/short.out "the kernel gave"
check_eq "node1 pool as it was after the shortfall" "$base1" "$(nr1)"
pvetune status 602 > /tmp/status.out 2>&1
cat /tmp/status.out
if grep -q nr_hugepages /tmp/status.out; then fail "a reservation held after the shortfall"; else ok "no reservation held after the shortfall"; fi
# The failed start's record (its CPUs) goes with the next hook's reconcile, or by hand:
check_rc "rollback 602" 0 pvetune rollback 602
# Boot-time reservation (pvetune reserve, as the systemd unit runs it): node 1 only, kept for
# VM 603 across its start and stop, given back by rollback.
vm_config 603 "numa: 1" "hugepages: 2" "keephugepages: 1" "numa0: cpus=0-1,hostnodes=1,memory=64"
profile 603 'cpus: 4-5
hugepages:
  boot: true'
pvetune reserve > /tmp/reserve.out 2>&1
cat /tmp/reserve.out
check_contains "reserve names VM 603's pages" /tmp/reserve.out "VM 603: node 1: 32 x 2 MiB reserved at boot"
check_eq "node1 pool after reserve" $((base1 + 32)) "$(nr1)"
check_eq "node0 pool untouched by reserve" "$base0" "$(nr0)"
pvetune reserve > /dev/null 2>&1
check_eq "reserve again adds nothing" $((base1 + 32)) "$(nr1)"
check_rc "pre-start 603 on the boot reservation" 0 pvetune 603 pre-start
vm_start 603 || die "QEMU 603 did not start"
pvetune -q 603 post-start || fail "post-start 603"
vm_stop 603 && pvetune 603 post-stop || fail "stop 603"
check_eq "the boot reservation stays after 603 stopped" $((base1 + 32)) "$(nr1)"
check_rc "rollback 603 gives it back" 0 pvetune rollback 603
check_eq "node1 pool after rollback 603" "$base1" "$(nr1)"
rm -f /etc/pvetune/profiles/603.yaml
snapshot /tmp/hp-end
check_same "memory: everything as before" /tmp/hp-before /tmp/hp-end

# --- PCI: remove and rescan, every function back ---------------------------------------------
pci=/sys/bus/pci/devices
drv() { if [ -e "$pci/$1/driver" ]; then basename "$(readlink "$pci/$1/driver")"; else echo none; fi; }
d10=$(drv 0000:00:10.0) d110=$(drv 0000:00:11.0) d111=$(drv 0000:00:11.1)
note "edu drivers: 00:10.0 $d10, 00:11.0 $d110, 00:11.1 $d111"
# The kernel: remove takes the function away at once, rescan brings it back.
check_eq "remove 00:11.1" ok "$(try_write $pci/0000:00:11.1/remove 1)"
[ ! -e $pci/0000:00:11.1 ] && ok "00:11.1 gone after remove" || fail "00:11.1 still there after remove"
[ -e $pci/0000:00:11.0 ] && ok "00:11.0 stays when only 00:11.1 is removed" || fail "00:11.0 went with 00:11.1"
sleep 0.3
check_eq "rescan" ok "$(try_write /sys/bus/pci/rescan 1)"
for i in $(seq 50); do [ -e $pci/0000:00:11.1 ] && break; sleep 0.1; done
[ -e $pci/0000:00:11.1 ] && ok "00:11.1 back after rescan" || fail "00:11.1 not back after rescan"

snapshot /tmp/pci-before
vm_config 610 "hostpci0: 00:10" "hostpci1: 0000:00:11,pcie=0"
profile 610 'cpus: 4-5
pci-reset:
  method: remove-rescan
  timeout: 20'
pvetune plan 610 --phase pre-start > /tmp/plan.out 2>&1
cat /tmp/plan.out
check_contains "plan lists all three functions" /tmp/plan.out "0000:00:10.0 0000:00:11.0 0000:00:11.1 remove, rescan"
check_rc "pre-start 610: remove-rescan of 00:10 and both functions of 00:11" 0 pvetune 610 pre-start
for f in 0000:00:10.0 0000:00:11.0 0000:00:11.1; do
	[ -e $pci/$f ] && ok "$f back" || fail "$f not back"
done
check_eq "drivers as before" "$d10 $d110 $d111" "$(drv 0000:00:10.0) $(drv 0000:00:11.0) $(drv 0000:00:11.1)"
check_rc "post-stop 610" 0 pvetune 610 post-stop
snapshot /tmp/pci-after
check_same "PCI devices as before" /tmp/pci-before /tmp/pci-after

# The kernel's reset: offered (reset and reset_method) or not, pvetune agrees.
rm_=$(val $pci/0000:00:10.0/reset_method)
note "00:10.0 reset_method: $rm_, reset: $(val $pci/0000:00:10.0/reset)"
if [ -e $pci/0000:00:10.0/reset ]; then has=yes; else has=no; fi
if [ -e $pci/0000:00:10.0/reset_method ]; then hasm=yes; else hasm=no; fi
check_eq "reset and reset_method come together" "$has" "$hasm"
profile 611 'cpus: 4-5
pci-reset:
  method: reset
  devices: [0000:00:10.0]'
vm_config 611
if [ "$has" = yes ]; then
	check_rc "method: reset where the kernel offers one" 0 pvetune 611 pre-start
	pvetune 611 post-stop
else
	check_rc "method: reset refused without a reset method" 2 pvetune 611 pre-start
fi

# A device that is not there: refused before anything changes (00:10.0 listed first stays).
profile 612 'cpus: 4-5
pci-reset:
  devices: [0000:00:10.0, 0000:00:0e.0]'
vm_config 612
pvetune 612 pre-start > /tmp/absent.out 2>&1
check_eq "absent device refused: exit" 2 "$?"
cat /tmp/absent.out
check_contains "the refusal names the device" /tmp/absent.out "0000:00:0e.0"
profile 612 'cpus: 4-5
pci-reset:
  devices: [0000:00:10]'
check_rc "an address without a function in the profile is refused" 2 pvetune 612 pre-start
snapshot /tmp/pci-end
check_same "nothing changed by the refusals" /tmp/pci-before /tmp/pci-end
finish
