#!/bin/sh
# Runs the lab scenarios of this flavour one after the other and reports on the results port
# (/dev/ttyS1, a file on the host). Protocol, one line each, all starting with `LAB `:
#   boot <flavour> <kernel>        the guest is up
#   begin <scenario>               a scenario starts
#   check <scenario> ok|fail <text>  one check (written by lib.sh)
#   fact <scenario> <key>|<title>|<value>  one observed fact (lib.sh `fact`), for
#                                  docs/kernel-facts.md
#   log <scenario> <line>          the scenario's stdout+stderr, after it ended
#   end <scenario> <exit code> <s> 124 means the scenario's own time limit killed it; <s> is
#                                  how long it ran, in seconds
#   done                           every scenario ran
if [ -x /lab/bin/busybox ] && [ ! -e /lab/bin/sh ]; then
	# The systemd guest: busybox's tools first on PATH (see init), except those that would
	# shadow systemd's way of stopping the machine.
	/lab/bin/busybox --install -s /lab/bin
	rm -f /lab/bin/init /lab/bin/poweroff /lab/bin/reboot /lab/bin/halt
	export PATH=/lab/bin:$PATH
	exec /lab/bin/sh "$0" "$@"
fi
. /lab/guest/lib.sh

only=$(sed -n 's/.*lab\.only=\([^ ]*\).*/\1/p' /proc/cmdline)
# The matrix cell this guest stands for (pve8, pve9.1, ...), for scenarios' `# cells:` lines.
export LAB_CELL=$(sed -n 's/.*lab\.cell=\([^ ]*\).*/\1/p' /proc/cmdline)
report "boot $LAB_FLAVOUR $(uname -r) cell $LAB_CELL at $(cut -d' ' -f1 /proc/uptime) s"
for script in /lab/scenarios/*.sh; do
	name=$(basename "$script" .sh)
	case "$name" in *"$only"*) ;; *) continue ;; esac
	flavours=$(sed -n 's/^# flavours: //p' "$script")
	case " ${flavours:-busybox systemd} " in *" $LAB_FLAVOUR "*) ;; *) continue ;; esac
	cells=$(sed -n 's/^# cells: //p' "$script")
	[ -z "$cells" ] || case " $cells " in *" $LAB_CELL "*) ;; *) continue ;; esac
	limit=$(sed -n 's/^# timeout: //p' "$script")
	report "begin $name"
	started=$(cut -d' ' -f1 /proc/uptime)
	LAB_SCENARIO=$name timeout "${limit:-60}" sh "$script" > "/tmp/lab-$name.log" 2>&1
	rc=$?
	# busybox's timeout exits 143 (SIGTERM) where coreutils' says 124: report one code.
	[ "$rc" = 143 ] && rc=124
	took=$(awk -v s="$started" '{ printf "%.1f", $1 - s }' /proc/uptime)
	tail -n 200 "/tmp/lab-$name.log" | while IFS= read -r line; do
		report "log $name $line"
	done
	report "end $name $rc $took"
done
report "done at $(cut -d' ' -f1 /proc/uptime) s"
