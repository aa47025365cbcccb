#!/bin/bash
# The shell way, as the forum hookscripts do it (seed 003's script, ayufan/pve-helpers): the
# benchmark's baseline against pvetune (bench/run). The same changes as the benchmark profile,
# the way those scripts make them: a hard-coded CPU table (here from the environment), every
# IRQ's smp_affinity_list written with `echo`, every QEMU thread found by its
# /proc/<pid>/task/*/comm and pinned with `taskset -pc`, the governor and the sysctl with
# `echo`, and the old values saved to a file and put back on stop. QEMU does not name
# iothreads by their id (seed 003: "the only way to do it is to reach to QEMU monitor"): the
# benchmark hands the iothread's tid over in BENCH_IOTHREAD, found once beforehand, so the
# monitor round trip a real script needs is not counted. Only what bash must fork
# is forked (taskset); reads use `read`, not `$(cat ...)`, which flatters the shell.
#
#
# Called by a name that ends in `-kthreads` (bench/run makes the link), it also does seed 003's
# pinKthreads: every task whose stat flags have PF_KTHREAD gets `taskset -pc` off the VM's CPUs
# in post-start (many refuse: per-CPU threads; ignored, as the seed does) and its old CPUs back
# in post-stop. The benchmark's kernel threads are stand-ins (bench/kthreads.c).
#
#   PVETUNE_ROOT=<tree> BENCH_HK=2-255 BENCH_HK_MASK=... BENCH_VCPUS=1,0 BENCH_EMU=0 \
#   BENCH_IO=1 BENCH_IOTHREAD=<tid> BENCH_POLICIES=0,1 shell-hook.sh <vmid> <phase>
vmid=$1
phase=$2
R=${PVETUNE_ROOT:?}
state=$R/run/shell-hook.$vmid
mkdir -p "$R/run"
case ${0##*/} in *-kthreads) kthreads=1 ;; *) kthreads=0 ;; esac

case $phase in
pre-start)
	# IRQs off the VM's CPUs (seed 003's pinIrqs); managed IRQs refuse: ignored.
	for f in "$R"/proc/irq/*/smp_affinity_list; do
		read -r old <"$f"
		echo "$f $old"
		echo "$BENCH_HK" >"$f" 2>/dev/null
	done >"$state.files"
	f=$R/proc/irq/default_smp_affinity
	read -r old <"$f"
	echo "$f $old" >>"$state.files"
	echo "$BENCH_HK_MASK" >"$f"
	;;
post-start)
	read -r pid <"$R/var/run/qemu-server/$vmid.pid"
	IFS=, read -r -a vcpus <<<"$BENCH_VCPUS"
	for task in "$R/proc/$pid/task/"*; do
		tid=${task##*/}
		read -r comm <"$task/comm"
		while read -r key value; do
			[ "$key" = Cpus_allowed_list: ] && echo "$tid $value"
		done <"$task/status"
		case $comm in
		"CPU "*/*) n=${comm#CPU }; cpu=${vcpus[${n%%/*}]} ;;
		*) cpu=$BENCH_EMU ;;
		esac
		[ "$tid" = "$BENCH_IOTHREAD" ] && cpu=$BENCH_IO
		taskset -pc "$cpu" "$tid" >/dev/null
	done >"$state.threads"
	IFS=, read -r -a policies <<<"$BENCH_POLICIES"
	for p in "${policies[@]}"; do
		f=$R/sys/devices/system/cpu/cpufreq/policy$p/scaling_governor
		read -r old <"$f"
		echo "$f $old" >>"$state.files"
		echo performance >"$f"
	done
	f=$R/proc/sys/vm/stat_interval
	read -r old <"$f"
	echo "$f $old" >>"$state.files"
	echo 120 >"$f"
	if [ $kthreads = 1 ]; then
		for s in "$R"/proc/[0-9]*/stat; do
			read -r -a stat <"$s" 2>/dev/null || continue
			((stat[8] & 0x200000)) || continue
			d=${s%/stat}
			while read -r key value; do
				[ "$key" = Cpus_allowed_list: ] && echo "${d##*/} $value"
			done <"$d/status"
			taskset -pc "$BENCH_HK" "${d##*/}" >/dev/null 2>&1
		done >"$state.kthreads"
	fi
	;;
post-stop)
	if [ -f "$state.threads" ]; then
		while read -r tid cpus; do
			taskset -pc "$cpus" "$tid" >/dev/null 2>&1
		done <"$state.threads"
	fi
	if [ -f "$state.files" ]; then
		while read -r f old; do
			echo "$old" >"$f" 2>/dev/null
		done <"$state.files"
	fi
	if [ -f "$state.kthreads" ]; then
		while read -r pid cpus; do
			taskset -pc "$cpus" "$pid" >/dev/null 2>&1
		done <"$state.kthreads"
	fi
	rm -f "$state.files" "$state.threads" "$state.kthreads"
	;;
esac
exit 0
