# Invalid input exits 2 and changes nothing; a VM without a profile exits 0 and is left alone.
# timeout: 60
. /lab/guest/lib.sh
vmid=102
vm_config $vmid
snapshot /tmp/before

check_rc "VM without a profile" 0 pvetune $vmid pre-start
check_rc "unknown phase" 2 pvetune $vmid mid-start
profile $vmid 'cpus: 8-11'
check_rc "CPUs this host does not have" 2 pvetune $vmid pre-start
profile $vmid "$LAB_PROFILE"
chmod 0666 /etc/pvetune/profiles/$vmid.yaml
check_rc "world-writable profile" 2 pvetune $vmid pre-start
rm /etc/pvetune/profiles/$vmid.yaml

snapshot /tmp/after
check_same "nothing changed" /tmp/before /tmp/after
finish
