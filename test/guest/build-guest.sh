#!/usr/bin/env bash
# Builds the tiny test guest used by vmkeep's integration tests and demo.
#
#   sudo bash test/guest/build-guest.sh
#
# Output: test/.cache/guest/<kernel package>_<version>_<recipe hash>/{vmlinuz,initramfs.gz}
# (git-ignored).
# The last line of stdout is the absolute path of that folder; all other output goes to stderr.
#
# - vmlinuz: the Debian cloud kernel (the package behind linux-image-cloud-amd64). It boots
#   in about 2 s under TCG, the generic kernel takes about 6 s.
# - initramfs.gz: static busybox, button.ko + evdev.ko (ACPI power button as an input device),
#   busybox acpid whose handler prints "GUEST POWEROFF" and powers off, and an /init that
#   prints "GUEST READY" once acpid listens, then "GUEST TICK n" every second.
# - Disks: virtio-blk (its virtio modules; ext4 is built into the cloud kernel). A first disk
#   with an ext4 filesystem is mounted on /data before READY, and a writer appends fixed-size
#   records to /data/records (see the writer below for the format and test/support/records-check.ts
#   for the checker), fsyncs each and then prints "GUEST WROTE n". The power button stops the
#   writer and unmounts /data before powering off.
#   Boot with: -append "console=ttyS0 quiet panic=-1" -serial file:LOG
#   With "vmkeep_ip=ADDR/PREFIX" on the command line, the first virtio-net NIC gets that address
#   and a TCP echo service on port 7 ("GUEST NET ADDR/PREFIX MAC" before READY). With
#   "vmkeep.connect=ADDR:PORT[,ADDR:PORT...]" (IPv4 or IPv6) as well, the guest connects to each
#   once a second and prints what came back ("GUEST CONNECT n ADDR:PORT GOT line" or "...
#   FAILED"), and "GUEST NET6 ADDR" (in hex) once it has an IPv6 address beyond its link (SLAAC).
#
# Idempotent: when the folder for the current kernel package version and this script's
# content already holds both files, nothing is rebuilt.
# Needs root (apt-get, mknod). Runs `apt-get update` only when apt cannot find or fetch
# what it needs.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=$(cd "$script_dir/.." && pwd)/.cache/guest

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (needs apt-get and mknod)"

apt_updated=0
apt_update_once() {
  if [[ $apt_updated -eq 0 ]]; then
    log "running apt-get update"
    apt-get update >&2
    apt_updated=1
  fi
}

# Prints "<package> <version>" of the versioned kernel package behind the meta package.
resolve_kernel() {
  local pkg version
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n1) || true
  [[ -n $pkg ]] || return 1
  version=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null |
    sed -n 's/^Version: //p' | head -n1) || true
  [[ -n $version ]] || return 1
  printf '%s %s\n' "$pkg" "$version"
}

ensure_busybox_static() {
  if [[ $(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null) == 'install ok installed' ]]; then
    return
  fi
  log "installing busybox-static"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends busybox-static >&2; then
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends busybox-static >&2
  fi
}

if ! kernel=$(resolve_kernel); then
  apt_update_once
  kernel=$(resolve_kernel) || die "apt cannot resolve linux-image-cloud-amd64 even after apt-get update"
fi
kernel_pkg=${kernel% *}
kernel_version=${kernel#* }
# The recipe's own hash is part of the key: editing this script rebuilds the guest.
recipe=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)
out_dir="$cache_root/${kernel_pkg}_${kernel_version//:/_}_$recipe"

mkdir -p "$cache_root"
# Two test runs building at once must not interleave: the second one waits, then finds the result.
exec 9>"$cache_root/.lock"
flock 9

if [[ -f $out_dir/vmlinuz && -f $out_dir/initramfs.gz ]]; then
  log "up to date: $out_dir"
  printf '%s\n' "$out_dir"
  exit 0
fi

ensure_busybox_static
busybox=/bin/busybox
# Not `| grep -q`: with pipefail, grep quitting early makes busybox die of SIGPIPE.
[[ $'\n'$("$busybox" --list)$'\n' == *$'\nacpid\n'* ]] || die "$busybox has no acpid applet"

work=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading $kernel_pkg $kernel_version"
if ! (cd "$work" && apt-get download -o APT::Sandbox::User=root "$kernel_pkg=$kernel_version" >&2); then
  # A stale package list points at a version the mirror no longer serves.
  apt_update_once
  kernel=$(resolve_kernel) || die "apt cannot resolve linux-image-cloud-amd64"
  [[ $kernel == "$kernel_pkg $kernel_version" ]] ||
    die "kernel package changed to '$kernel' after apt-get update; run this script again"
  (cd "$work" && apt-get download -o APT::Sandbox::User=root "$kernel_pkg=$kernel_version" >&2)
fi
dpkg -x "$work"/"${kernel_pkg}"_*.deb "$work/pkg"

vmlinuz=$(find "$work/pkg/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
[[ -n $vmlinuz ]] || die "no boot/vmlinuz-* in $kernel_pkg"

root="$work/initramfs"
# acpid exits at start when it cannot open its log file (/var/log/acpid.log).
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,data,var/log,var/run,lib/modules,etc/acpi/PWRF}
cp "$busybox" "$root/bin/busybox"
# The kernel opens /dev/console before running /init; without the node /init has no output.
mknod -m 600 "$root/dev/console" c 5 1

# Copies a module into the initramfs, uncompressed (busybox insmod loads plain .ko files).
add_module() {
  local name=$1 found
  found=$(find "$work/pkg" -path "*/kernel/$name.ko*" | head -n1)
  [[ -n $found ]] || die "module $name not found in $kernel_pkg"
  case $found in
    *.ko.xz) xz -dc "$found" >"$root/lib/modules/$(basename "$name").ko" ;;
    *.ko) cp "$found" "$root/lib/modules/" ;;
    *) die "unsupported module compression: $found" ;;
  esac
}
add_module drivers/acpi/button
add_module drivers/input/evdev
# In load order: virtio-blk over virtio-pci.
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci; do add_module "drivers/virtio/$m"; done
add_module drivers/block/virtio_blk

# Network (virtio-net over the virtio-pci modules above): the driver and its dependencies,
# loaded by /init's network block.
add_module net/core/failover
add_module drivers/net/net_failover
add_module drivers/net/virtio_net

cat >"$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
# The writer stops between two records; unmounting writes everything back and leaves the
# filesystem clean for e2fsck.
if [ -f /run/writer.pid ]; then kill "$(cat /run/writer.pid)" 2>/dev/null; while kill -0 "$(cat /run/writer.pid)" 2>/dev/null; do sleep 0.01; done; fi
if grep -q ' /data ' /proc/mounts; then umount /data || { sync; echo "GUEST DISK UNMOUNT FAILED"; }; fi
echo "GUEST POWEROFF" >/dev/console
# The line leaves the serial port before the power goes: stty sets its (unchanged) mode with
# TCSADRAIN, which waits until the port has sent everything. Without it a starved TCG vCPU
# powered off with the line still in the UART's buffer.
stty -F /dev/console opost 2>/dev/null
poweroff -f
EOF
chmod 755 "$root/etc/acpi/PWRF/00000080"

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
insmod /lib/modules/button.ko
insmod /lib/modules/evdev.ko
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do insmod /lib/modules/$m.ko; done

# acpid opens the input devices once at start: the power button must exist first.
has_power_button() {
  for f in /sys/class/input/event*/device/name; do
    [ -r "$f" ] && [ "$(cat "$f")" = "Power Button" ] && return 0
  done
  return 1
}
waited=0
until has_power_button; do
  waited=$((waited + 1))
  if [ "$waited" -gt 200 ]; then
    echo "GUEST ERROR no Power Button input device"
    break
  fi
  sleep 0.05
done
# "vmkeep.ignore_acpi" on the kernel command line: a guest that ignores the power button,
# for tests of what vmkeep does when ACPI power-off is not honoured.
if grep -q 'vmkeep.ignore_acpi' /proc/cmdline; then
  echo "GUEST IGNORES ACPI"
else
  # In the foreground (-f) so its PID is known: acpid opens the input devices only after it
  # daemonizes, and READY must mean a power-button press will be seen.
  acpid -f -c /etc/acpi &
  acpid_pid=$!
  waited=0
  until ls -l /proc/$acpid_pid/fd 2>/dev/null | grep -q /dev/input/event; do
    waited=$((waited + 1))
    [ "$waited" -gt 200 ] && { echo "GUEST ERROR acpid did not open the input devices"; break; }
    sleep 0.02
  done
fi

# "vmkeep.fill_mib=N": the guest writes N MiB of non-zero data into its RAM (the initramfs's
# own ramfs) before READY, so a test can tell a refresh that copies guest RAM from one that
# hands it over. One random MiB, repeated: cheap to make, never all zero.
fill=$(sed -n 's/.*vmkeep\.fill_mib=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$fill" ]; then
  dd if=/dev/urandom of=/fill.1m bs=1024 count=1024 2>/dev/null
  i=0
  while [ "$i" -lt "$fill" ]; do cat /fill.1m; i=$((i + 1)); done >/fill.bin
  echo "GUEST FILLED $fill MiB"
fi

# "vmkeep_ip=ADDR/PREFIX": the first NIC (virtio-net) gets that static address and a TCP echo
# service on port 7 (one process per connection), for tests of connections across refreshes.
ip_cidr=$(sed -n 's/.*vmkeep_ip=\([0-9./]*\).*/\1/p' /proc/cmdline)
if [ -n "$ip_cidr" ]; then
  for m in failover net_failover virtio_net; do
    insmod /lib/modules/$m.ko 2>/dev/null || grep -q "^$m " /proc/modules || echo "GUEST ERROR insmod $m"
  done
  waited=0
  until [ -e /sys/class/net/eth0 ]; do
    waited=$((waited + 1))
    [ "$waited" -gt 200 ] && { echo "GUEST ERROR no eth0"; break; }
    sleep 0.05
  done
  ip link set lo up
  ip addr add "$ip_cidr" dev eth0
  ip link set eth0 up
  nc -ll -p 7 -e cat &
  echo "GUEST NET $ip_cidr $(cat /sys/class/net/eth0/address)"
  # "vmkeep.connect=ADDR:PORT,...": what the guest's network reaches, e.g. the host's loopback
  # through QEMU's user-mode network (10.0.2.2, fec0::2). Attempt n prints, for each target, its
  # first line read, or FAILED (refused, timed out after 2 s, or closed without a line).
  connect_to=$(sed -n 's/.*vmkeep\.connect=\([0-9a-f.:,]*\).*/\1/p' /proc/cmdline)
  if [ -n "$connect_to" ]; then
    (
      n=0
      net6=
      while true; do
        n=$((n + 1))
        if [ -z "$net6" ]; then
          # /proc/net/if_inet6: address in hex, index, prefix length, scope, flags, name. Not
          # link (20) or host (10) scope: slirp's prefix fec0::/64 is site scope (40).
          net6=$(awk '$4 != "20" && $4 != "10" && $6 == "eth0" { print $1; exit }' /proc/net/if_inet6)
          [ -n "$net6" ] && echo "GUEST NET6 $net6"
        fi
        for target in $(echo "$connect_to" | tr ',' ' '); do
          got=$(nc -w 2 "${target%:*}" "${target##*:}" </dev/null 2>/dev/null | head -n 1)
          if [ -n "$got" ]; then echo "GUEST CONNECT $n $target GOT $got"; else echo "GUEST CONNECT $n $target FAILED"; fi
        done
        sleep 1
      done
    ) &
  fi
fi

# A first disk holding ext4 is mounted on /data. The virtio-blk probe is asynchronous: when
# the PCI bus has a virtio-blk device (1af4:1001 or 1af4:1042), its /dev/vda is waited for.
has_virtio_blk() {
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0x1af4 ] || continue
    case $(cat "$d/device") in 0x1001|0x1042) return 0 ;; esac
  done
  return 1
}
if has_virtio_blk; then
  waited=0
  while [ ! -b /dev/vda ] && [ "$waited" -lt 250 ]; do waited=$((waited + 1)); sleep 0.02; done
  if [ ! -b /dev/vda ]; then
    echo "GUEST DISK ERROR no /dev/vda"
  elif mount -t ext4 /dev/vda /data; then
    echo "GUEST DISK MOUNTED"
  else
    echo "GUEST DISK ERROR mount failed"
  fi
fi

# The writer: fixed-size 64-byte records appended to /data/records, each
#   "R <seq, 10 digits> <uptime in centiseconds, 12 digits> <check, 10 digits>" + spaces + "\n"
# where check = (seq * 2654435761 + time * 40503 + 12345) mod 4294967291: a checksum of the
# record's own content, so a torn or altered record is told from a whole one. Each record is
# written with one write(2) and fsynced (busybox sync FILE); only then is "GUEST WROTE seq" printed. After a reboot
# it goes on after the last record in the file. "vmkeep.writer=nosync" skips the fsync (a
# negative control: what it prints may be lost); "vmkeep.writer=off" does not write.
writer_mode=$(sed -n 's/.*vmkeep\.writer=\([a-z]*\).*/\1/p' /proc/cmdline)
if grep -q ' /data ' /proc/mounts && [ "$writer_mode" != off ]; then
  (
    # Leading zeros would make the shell read a number as octal.
    dec() { v=$1; while [ "${#v}" -gt 1 ] && [ "${v#0}" != "$v" ]; do v=${v#0}; done; echo "$v"; }
    seq=0
    if [ -s /data/records ]; then
      set -- $(tail -n 1 /data/records)
      [ "$1" = R ] && seq=$(dec "$2")
    fi
    [ -f /data/records ] || { : >/data/records; sync /data/records /data; }
    echo "GUEST WRITER FROM $((seq + 1))"
    while true; do
      seq=$((seq + 1))
      read up _ </proc/uptime
      t=${up%.*}${up#*.}
      while [ "${#t}" -gt 1 ] && [ "${t#0}" != "$t" ]; do t=${t#0}; done
      check=$(( (seq * 2654435761 + t * 40503 + 12345) % 4294967291 ))
      printf 'R %010d %012d %010d                           \n' "$seq" "$t" "$check" >>/data/records
      [ "$writer_mode" = nosync ] || sync /data/records
      echo "GUEST WROTE $seq"
    done
  ) &
  echo $! >/run/writer.pid
fi

echo "GUEST READY"

# "vmkeep.flood_kib=N": once READY, the guest prints N KiB of text to its console (1 KiB lines
# of one repeated block), then "GUEST FLOODED" and its ticks: a test of the bounded logs.
flood=$(sed -n 's/.*vmkeep\.flood_kib=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$flood" ]; then
  line="GUEST FLOOD $(printf '%01011d' 0)"
  i=0
  while [ "$i" -lt 64 ]; do echo "$line"; i=$((i + 1)); done >/flood.64k
  i=0
  while [ "$i" -lt "$flood" ]; do cat /flood.64k; i=$((i + 64)); done
  echo "GUEST FLOODED"
fi
n=0
while true; do
  n=$((n + 1))
  echo "GUEST TICK $n"
  sleep 1
done
EOF
chmod 755 "$root/init"

mkdir -p "$work/out"
cp "$vmlinuz" "$work/out/vmlinuz"
(cd "$root" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -9) >"$work/out/initramfs.gz"

# Publish the finished folder in one rename so a crash never leaves a half-built cache.
rm -rf "$out_dir"
mv "$work/out" "$out_dir"
log "built $out_dir"
printf '%s\n' "$out_dir"
