# The order Proxmox really uses on a stop: QEMU is gone before post-stop runs. pvetune must
# restore the host-wide state (the sysctl) without the threads, exit 0, and hold nothing after.
# timeout: 90
. /lab/guest/lib.sh
vmid=101
vm_config $vmid
profile $vmid "$LAB_PROFILE"
snapshot /tmp/before

check_rc "pre-start" 0 pvetune $vmid pre-start
vm_start $vmid || die "QEMU did not start"
check_rc "post-start" 0 pvetune -q $vmid post-start
check_pinned "$(vm_pid $vmid)" 4 5 6 7
check_eq "vm.stat_interval while running" 120 "$(cat /proc/sys/vm/stat_interval)"

vm_stop $vmid || fail "QEMU did not stop"
check_rc "post-stop after QEMU exited" 0 pvetune $vmid post-stop
snapshot /tmp/after
check_same "host state restored" /tmp/before /tmp/after
pvetune status $vmid > /tmp/status.out 2>&1
cat /tmp/status.out
finish
