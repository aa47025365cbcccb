# systemd owns qemu.slice/<vmid>.scope on a Proxmox host. A `systemctl daemon-reload` after
# pvetune's post-start (any package upgrade does one) must not undo what pvetune did.
# flavours: systemd
# timeout: 90
. /lab/guest/lib.sh
vmid=103
vm_config $vmid
profile $vmid "$LAB_PROFILE"

check_rc "pre-start" 0 pvetune $vmid pre-start
vm_start $vmid || die "QEMU did not start"
pid=$(vm_pid $vmid)
check_eq "QEMU's cgroup" "0::/qemu.slice/$vmid.scope" "$(cat /proc/$pid/cgroup)"
snapshot /tmp/before $vmid
check_rc "post-start" 0 pvetune -q $vmid post-start
snapshot /tmp/applied $vmid

systemctl daemon-reload || fail "daemon-reload failed"
sleep 1
snapshot /tmp/reloaded $vmid
check_same "daemon-reload keeps pvetune's changes" /tmp/applied /tmp/reloaded
check_pinned "$pid" 4 5 6 7
systemctl show -p AllowedCPUs -p EffectiveCPUs "$vmid.scope"

check_rc "post-stop" 0 pvetune $vmid post-stop
snapshot /tmp/after $vmid
check_same "post-stop restores everything" /tmp/before /tmp/after
vm_stop $vmid || fail "QEMU did not stop"
finish
