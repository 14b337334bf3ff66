#!/bin/sh
# Boots a private systemd as PID 1 of new pid/mount/uts/ipc/cgroup namespaces.
# Started by test/support/systemd-host.ts under `script` (whose pty becomes /dev/console).
# Each stage execs the next, so the process that runs `pid1` ends up being systemd itself.
#
# Environment (set by systemd-host.ts):
#   VMKEEP_TH_RUN     host directory that becomes /run inside (holds units and system.conf.d)
#   VMKEEP_TH_CGROUP  host cgroup2 directory (already created) that becomes the cgroup root inside
#   VMKEEP_TH_PIDFILE host file that receives the host PID of the private PID 1
set -eu

stage=${1:?usage: boot.sh start}

case "$stage" in
start)
	# Mount propagation private: nothing mounted inside ever shows on the host.
	exec unshare --pid --fork --mount --uts --ipc --propagation private "$0" pid1
	;;
pid1)
	# /proc is still the host's here, so /proc/self/stat names our host PID.
	read -r hostpid _rest </proc/self/stat
	echo "$hostpid" >"$VMKEEP_TH_PIDFILE.tmp"
	mv "$VMKEEP_TH_PIDFILE.tmp" "$VMKEEP_TH_PIDFILE"
	# Only this process moves ("0" = the writer); its parents stay where they are.
	echo 0 >"$VMKEEP_TH_CGROUP/cgroup.procs"
	exec unshare --cgroup "$0" mounts
	;;
mounts)
	console=$(tty)
	mount --bind "$VMKEEP_TH_RUN" /run
	mount -t proc proc /proc
	# systemd must not change the host's sysctls.
	mount --bind /proc/sys /proc/sys
	mount -o remount,bind,ro /proc/sys
	# A boot ID of its own, new at each boot (as systemd-nspawn gives a container): what tells
	# a host boot from a daemon restart.
	mount --bind /run/vmkeep-boot-id /proc/sys/kernel/random/boot_id
	# Replace the host's hybrid cgroup mounts by our own cgroup2 subtree only.
	umount -R /sys/fs/cgroup
	mount -o remount,bind,ro /sys
	mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
	mount --bind "$console" /dev/console
	# Extra binds, one "HOST<tab>INSIDE" per line (private: the host never sees them).
	if [ -n "${VMKEEP_TH_BINDS:-}" ]; then
		tab=$(printf '\t')
		printf '%s\n' "$VMKEEP_TH_BINDS" | while IFS="$tab" read -r src dst; do
			mount --bind "$src" "$dst"
		done
	fi
	export container=other
	export SYSTEMD_UNIT_PATH=/run/vmkeep-units:/run/systemd/system.control:/run/systemd/transient:/run/systemd/system${VMKEEP_TH_UNIT_PATH_TAIL:-}
	# No generators: they read the host's fstab, gettys, sysv scripts, ...
	export SYSTEMD_GENERATOR_PATH=/run/vmkeep-empty
	export SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/vmkeep-empty
	unset VMKEEP_TH_RUN VMKEEP_TH_CGROUP VMKEEP_TH_PIDFILE VMKEEP_TH_BINDS VMKEEP_TH_UNIT_PATH_TAIL
	exec /lib/systemd/systemd --system --unit=vmkeep-testhost.target
	;;
*)
	echo "boot.sh: unknown stage $stage" >&2
	exit 2
	;;
esac
