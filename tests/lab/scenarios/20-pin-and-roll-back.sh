# pvetune pins a real QEMU's vCPUs 1:1 (SMT-aware), its emulator and iothreads to housekeeping,
# sets a sysctl, skips the governor with a warning (no cpufreq in the guest), and post-stop puts
# every bit of it back: the state after is exactly the state before.
# timeout: 90
. /lab/guest/lib.sh
vmid=100
vm_config $vmid
profile $vmid "$LAB_PROFILE"

pvetune check $vmid > /tmp/check.out 2>&1
check_eq "check exit" 0 $?
cat /tmp/check.out

# Proxmox's order: pre-start, then QEMU starts in its scope, then post-start.
check_rc "pre-start" 0 pvetune $vmid pre-start
vm_start $vmid || die "QEMU did not start"
pid=$(vm_pid $vmid)
snapshot /tmp/before $vmid

pvetune plan $vmid --phase post-start > /tmp/plan.out 2>&1
check_eq "plan exit" 0 $?
cat /tmp/plan.out
check_contains "plan shows the sysctl" /tmp/plan.out "stat_interval"
check_contains "plan shows the governor skip" /tmp/plan.out "governor"
snapshot /tmp/after-plan $vmid
check_same "plan changes nothing" /tmp/before /tmp/after-plan

pvetune $vmid post-start 2> /tmp/post-start.err
check_eq "post-start exit" 0 $?
cat /tmp/post-start.err
check_contains "governor warning names the governor" /tmp/post-start.err governor
check_contains "governor warning names cpufreq" /tmp/post-start.err cpufreq
check_pinned "$pid" 4 5 6 7
check_eq "vm.stat_interval" 120 "$(cat /proc/sys/vm/stat_interval)"
pvetune status $vmid > /tmp/status.out 2>&1
check_eq "status exit" 0 $?
cat /tmp/status.out

check_rc "post-stop" 0 pvetune $vmid post-stop
snapshot /tmp/after $vmid
check_same "post-stop restores everything" /tmp/before /tmp/after

vm_stop $vmid || fail "QEMU did not stop"
finish
