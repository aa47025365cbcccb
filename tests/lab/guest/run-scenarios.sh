#!/bin/sh
# Runs the lab scenarios of this flavour one after the other and reports on the results port
# (/dev/ttyS1, a file on the host). Protocol, one line each, all starting with `LAB `:
#   boot <flavour> <kernel>        the guest is up
#   begin <scenario>               a scenario starts
#   check <scenario> ok|fail <text>  one check (written by lib.sh)
#   log <scenario> <line>          the scenario's stdout+stderr, after it ended
#   end <scenario> <exit code>     124 means the scenario's own time limit killed it
#   done                           every scenario ran
. /lab/guest/lib.sh

report "boot $LAB_FLAVOUR $(uname -r)"
only=$(sed -n 's/.*lab\.only=\([^ ]*\).*/\1/p' /proc/cmdline)
for script in /lab/scenarios/*.sh; do
	name=$(basename "$script" .sh)
	case "$name" in *"$only"*) ;; *) continue ;; esac
	flavours=$(sed -n 's/^# flavours: //p' "$script")
	case " ${flavours:-busybox systemd} " in *" $LAB_FLAVOUR "*) ;; *) continue ;; esac
	limit=$(sed -n 's/^# timeout: //p' "$script")
	report "begin $name"
	LAB_SCENARIO=$name timeout "${limit:-60}" sh "$script" > "/tmp/lab-$name.log" 2>&1
	rc=$?
	tail -n 200 "/tmp/lab-$name.log" | while IFS= read -r line; do
		report "log $name $line"
	done
	report "end $name $rc"
done
report done
