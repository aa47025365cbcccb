# Helpers for lab scenarios (sourced; POSIX sh: busybox ash in one flavour, dash in the other).
#
# A scenario reports through `ok`, `fail` and the `check_*` functions; each writes one
# `LAB check` line to the results port. A scenario fails when any check failed or when it
# exits non-zero, so setup steps end with `|| die "what failed"`.

LAB_RESULTS=/dev/ttyS1
# The runner exports LAB_SCENARIO; outside the runner (e.g. by hand) call it `manual`.
: "${LAB_SCENARIO:=manual}"
LAB_FAILED=0

report() {
	# One open and close per line: closing a tty waits for its output to drain, so nothing
	# is lost when the guest powers off right after the last line.
	printf 'LAB %s\n' "$*" > "$LAB_RESULTS"
}

ok() { report "check $LAB_SCENARIO ok $*"; }

# note <text>: a fact worth knowing that is not a check (kept in results.log, shown on failure).
note() {
	report "note $LAB_SCENARIO $*"
	echo "note: $*"
}

# fact <key> <title> <value>: what this kernel or systemd really does, one table row of
# docs/kernel-facts.md per key (the value must not vary from run to run: no timings, no pids).
fact() {
	report "fact $LAB_SCENARIO $1|$2|$3"
	echo "fact: $1 = $3"
}

fail() {
	report "check $LAB_SCENARIO fail $*"
	echo "FAIL: $*" >&2
	LAB_FAILED=1
}

die() {
	fail "$*"
	exit 1
}

# check_eq <what> <expected> <actual>
check_eq() {
	if [ "$2" = "$3" ]; then ok "$1 = $2"; else fail "$1: expected '$2', got '$3'"; fi
}

# check_rc <what> <expected exit code> <command...>: runs the command, output to the log.
# (`local` is not POSIX, but both shells the lab uses have it, and without it every helper
# would overwrite the scenario's own variables, `vmid` first of all.)
check_rc() {
	local what=$1 want=$2 rc
	shift 2
	"$@"
	rc=$?
	if [ "$rc" = "$want" ]; then ok "$what: exit $rc"; else fail "$what: expected exit $want, got $rc ($*)"; fi
}

# check_contains <what> <file> <text>
check_contains() {
	if grep -qi -- "$3" "$2"; then ok "$1"; else fail "$1: '$3' not in $(head -c 500 "$2")"; fi
}

# check_same <what> <before file> <after file>: the kernel state is exactly what it was.
check_same() {
	if diff -u "$2" "$3" > /tmp/lab-diff 2>&1; then
		ok "$1"
	else
		cat /tmp/lab-diff
		fail "$1: state differs ($(grep -c '^[-+][^-+]' /tmp/lab-diff) lines, diff in the log)"
	fi
}

# finish: the scenario's exit code (call last).
finish() { exit "$LAB_FAILED"; }

# --- the "VM": a real QEMU, paused, with the threads Proxmox's QEMU has --------------------

# The VM's guest topology (`-smp`), in its config (`args:`) and on QEMU's command line; a
# scenario sets it before vm_config and vm_start for a smaller VM.
LAB_VM_SMP=4,sockets=1,cores=2,threads=2

# vm_config <vmid> [extra config lines...]: /etc/pve/qemu-server/<vmid>.conf as Proxmox writes it.
vm_config() {
	local vmid=$1 line
	shift
	mkdir -p /etc/pve/qemu-server
	{
		echo "name: lab"
		echo "memory: 64"
		echo "sockets: 1"
		echo "cores: 2"
		echo "args: -smp $LAB_VM_SMP"
		for line in "$@"; do echo "$line"; done
	} > "/etc/pve/qemu-server/$vmid.conf"
}

# profile <vmid> <yaml>: the pvetune profile, owned by root, mode 0644 as pvetune requires.
profile() {
	mkdir -p /etc/pvetune/profiles
	printf '%s\n' "$2" > "/etc/pvetune/profiles/$1.yaml"
	chmod 0644 "/etc/pvetune/profiles/$1.yaml"
}

# vm_start <vmid> [iothread id]: starts QEMU the way qemu-server does, in qemu.slice/<vmid>.scope.
vm_start() {
	local vmid=$1 iothread=${2:-iothread-virtioscsi0}
	mkdir -p /var/run/qemu-server
	set -- qemu-system-x86_64 -accel tcg,thread=multi -machine q35 -m 64 \
		-smp "$LAB_VM_SMP" -object "iothread,id=$iothread" \
		-nographic -nodefaults -S -daemonize -pidfile "/var/run/qemu-server/$vmid.pid" \
		-qmp "unix:/var/run/qemu-server/$vmid.qmp,server=on,wait=off" -name lab,debug-threads=on
	if [ "$LAB_FLAVOUR" = systemd ]; then
		systemd-run --quiet --scope --slice=qemu.slice --unit="$vmid" "$@" || return 1
	else
		mkdir -p "/sys/fs/cgroup/qemu.slice/$vmid.scope"
		"$@" || return 1
		# Writing the pid to cgroup.procs moves every thread of the process.
		cat "/var/run/qemu-server/$vmid.pid" > "/sys/fs/cgroup/qemu.slice/$vmid.scope/cgroup.procs" || return 1
	fi
	vm_pid "$vmid" > /dev/null
}

vm_pid() {
	local pid
	read -r pid < "/var/run/qemu-server/$1.pid" && echo "$pid"
}

# vm_stop <vmid>: ends QEMU and waits until it is gone (its scope goes with it under systemd).
vm_stop() {
	local pid
	pid=$(vm_pid "$1") || return 1
	kill "$pid"
	for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
	[ ! -d "/proc/$pid" ] || { echo "QEMU $pid did not exit" >&2; return 1; }
	rmdir "/sys/fs/cgroup/qemu.slice/$1.scope" 2>/dev/null
	rm -f "/var/run/qemu-server/$1.pid"
	return 0
}

# Forks are what costs under TCG (~25 ms each with busybox, ~80 ms with a dynamically
# linked command), so the helpers below read files with the `read` builtin, not `$(cat ...)`.

# threads <pid>: `<tid> <allowed cpus> <comm>` for every thread (comm last: it may hold spaces).
threads() {
	local task comm key value cpus
	for task in /proc/"$1"/task/*; do
		read -r comm < "$task/comm" || continue
		while read -r key value; do
			[ "$key" = Cpus_allowed_list: ] && cpus=$value && break
		done < "$task/status"
		printf '%s %s %s\n' "${task##*/}" "$cpus" "$comm"
	done | sort -n
}

# affinity_of <pid> <comm>: the allowed CPUs of the first thread so named.
affinity_of() {
	local tid cpus comm
	threads "$1" | while read -r tid cpus comm; do
		[ "$comm" = "$2" ] && echo "$cpus" && break
	done
}

# dump <file...>: `<file>: <first line>` for each readable file.
dump() {
	local f v
	for f in "$@"; do
		[ -r "$f" ] || continue
		v=
		read -r v < "$f" 2>/dev/null
		echo "$f: $v"
	done
}

# try_write <file> <value>: writes, then prints `ok` or the errno's name (EINVAL, EPERM, ...):
# what the kernel answered, as a fact. (The `echo` builtin, not `printf`: busybox's printf
# fails silently, its echo names the error.)
try_write() {
	local err
	if err=$({ echo "$2" > "$1"; } 2>&1); then
		echo ok
		return 0
	fi
	case "$err" in
	*"Invalid argument"*) echo EINVAL ;;
	*"Operation not permitted"*) echo EPERM ;;
	*"I/O error"* | *"Input/output error"*) echo EIO ;;
	*"No space left"*) echo ENOSPC ;;
	*"busy"*) echo EBUSY ;;
	*"No such file"*) echo ENOENT ;;
	*"Permission denied"*) echo EACCES ;;
	*"not supported"* | *"Not supported"*) echo EOPNOTSUPP ;;
	*"out of range"*) echo ERANGE ;;
	*) echo "error: ${err##*: }" ;;
	esac
	return 1
}

# val <file>: its first line, `(empty)` for an empty file, `(absent)` when it does not exist.
val() {
	local v=
	[ -e "$1" ] || { echo "(absent)"; return; }
	read -r v < "$1" 2>/dev/null
	echo "${v:-(empty)}"
}

# --- kernel state ---------------------------------------------------------------------------

# expand <cpulist>: its CPUs as words (`4-6,8` -> `4 5 6 8`).
expand() {
	local part out=""
	for part in ${1//,/ }; do
		case "$part" in
		*-*) out="$out $(seq ${part%-*} ${part#*-} | tr '\n' ' ')" ;;
		*) out="$out $part" ;;
		esac
	done
	echo $out
}

# overlaps <cpulist> <cpulist>: true when they share a CPU.
overlaps() {
	local a b c
	a=$(expand "$1") b=$(expand "$2")
	for c in $a; do case " $b " in *" $c "*) return 0 ;; esac; done
	return 1
}

# Sysctls a tunable may touch (later issues add theirs); each as `name = value`.
LAB_SYSCTLS="vm/stat_interval vm/swappiness vm/dirty_ratio vm/nr_hugepages kernel/timer_migration
	kernel/numa_balancing kernel/sched_rt_runtime_us kernel/watchdog kernel/nmi_watchdog
	kernel/watchdog_cpumask"

# The cgroups Proxmox hosts have; what systemd adds on its own (sessions) would be noise.
LAB_CGROUPS=". init.scope system.slice user.slice qemu.slice"

# snapshot <file> [vmid]: everything a pvetune tunable may change, in a stable text form.
snapshot() {
	local out=$1 vmid=$2 c cgroups="$LAB_CGROUPS" pidfile
	[ -n "$vmid" ] && cgroups="$cgroups qemu.slice/$vmid.scope"
	{
		echo "== cpus"
		dump /sys/devices/system/cpu/online /sys/devices/system/cpu/isolated \
			/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor
		echo "== sysctl"
		for c in $LAB_SYSCTLS; do dump "/proc/sys/$c"; done
		echo "== cgroups"
		for c in $cgroups; do
			dump /sys/fs/cgroup/$c/cgroup.subtree_control /sys/fs/cgroup/$c/cpuset.cpus \
				/sys/fs/cgroup/$c/cpuset.mems /sys/fs/cgroup/$c/cpuset.cpus.partition \
				/sys/fs/cgroup/$c/cpuset.cpus.effective /sys/fs/cgroup/$c/cpuset.cpus.isolated \
				/sys/fs/cgroup/$c/cpuset.cpus.exclusive
		done
		echo "== hugepages"
		dump /sys/devices/system/node/node*/hugepages/hugepages-*/nr_hugepages
		echo "== ksm"
		dump /sys/kernel/mm/ksm/run
		echo "== irqs"
		dump /proc/irq/default_smp_affinity /proc/irq/*/smp_affinity_list
		echo "== workqueue"
		dump /sys/devices/virtual/workqueue/cpumask
		echo "== pci"
		echo /sys/bus/pci/devices/*
		for c in /sys/bus/pci/devices/*/driver; do
			[ -e "$c" ] && echo "$c -> $(readlink "$c")"
		done
		pidfile=/var/run/qemu-server/$vmid.pid
		if [ -n "$vmid" ] && [ -r "$pidfile" ]; then
			echo "== threads of VM $vmid"
			read -r c < "$pidfile"
			threads "$c"
		fi
	} > "$out"
}

# --- pvetune expectations -------------------------------------------------------------------

# The profile most scenarios use: VM owns the second socket (CPUs 4-7, SMT pairs 4,5 and 6,7).
LAB_PROFILE='cpus: 4-7
vcpus: auto
emulator: housekeeping
iothreads: housekeeping
governor: performance
sysctl:
  vm.stat_interval: 120'

# check_pinned <pid> <vcpu cpus...>: vCPU i on the i-th CPU given, every other thread
# (main loop, call_rcu, iothreads, QEMU's monitor iothread) on housekeeping CPUs 0-3.
check_pinned() {
	local pid=$1 i=0 cpu
	shift
	for cpu in "$@"; do
		check_eq "vCPU $i affinity" "$cpu" "$(affinity_of "$pid" "CPU $i/TCG")"
		i=$((i + 1))
	done
	threads "$pid" | while read -r tid cpus comm; do
		case "$comm" in "CPU "*/TCG) continue ;; esac
		check_eq "emulator thread $tid ($comm) affinity" 0-3 "$cpus"
	done
}
