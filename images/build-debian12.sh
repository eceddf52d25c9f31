#!/bin/bash
# Build the hvnode "debian-12" VM template (image id 9010) from Debian's own packages.
#
#   usage: build-debian12.sh [OUTPUT_DIR]
#
# Run as root on Debian 12. Needs: mmdebstrap grub-efi-amd64-bin mtools dosfstools fdisk
# e2fsprogs qemu-utils (this script installs nothing). Downloads only from Debian's apt
# repositories (deb.debian.org: bookworm, bookworm-updates, bookworm-security).
#
# Output (OUTPUT_DIR, default /var/cache/hvnode/images/<sha256 of the build inputs>/):
#   debian-12.qcow2   2 GiB virtual, GPT: p1 = EFI system partition (FAT, label ESP) with a
#                     standalone GRUB as \EFI\BOOT\BOOTX64.EFI, p2 = ext4 root (label
#                     debian-root), last on the disk so cloud-init's growpart can grow it.
#   9010.toml         manifest (id, name, os, description, file, format, sha256).
# The build happens in a temporary directory beside OUTPUT_DIR and is renamed into place at
# the end, so an existing OUTPUT_DIR is always complete: then the script just prints it.
# The last line printed on stdout is OUTPUT_DIR.
#
# The guest: boots under OVMF (UEFI) with kernel command line
# "console=tty0 console=ttyS0,115200 no_timer_check" (login prompt on the serial console),
# root locked, empty /etc/machine-id, no SSH host keys, cloud-init limited to NoCloud/None, and
# qemu-guest-agent started by udev when the virtio-serial port org.qemu.guest_agent.0 appears.
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# The whole script is one brace group, read by bash before it runs: editing or replacing
# this file while a build is running cannot change what that build does.
{

# ---------------------------------------------------------------- parameters
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security
DISK_SIZE_MIB=2048          # virtual size of the qcow2
ESP_SIZE_MIB=64             # p1, starts at 1 MiB
ROOT_LABEL=debian-root      # ext4 label (<= 16 chars), used by grub.cfg, root= and fstab
ESP_LABEL=ESP               # FAT label (<= 11 chars)
IMAGE_ID=9010
IMAGE_NAME=debian-12
IMAGE_FILE=debian-12.qcow2
# no_timer_check: the kernel's IO-APIC timer check fails when the vCPU is starved (seen
# under TCG on a loaded host: "IO-APIC + timer doesn't work!", a panic at boot); cloud
# images pass it for the same reason.
KERNEL_CMDLINE="root=LABEL=${ROOT_LABEL} ro console=tty0 console=ttyS0,115200 no_timer_check"
PACKAGES=(
    linux-image-cloud-amd64 systemd-sysv udev dbus
    cloud-init cloud-guest-utils qemu-guest-agent openssh-server
    ifupdown isc-dhcp-client iproute2 net-tools netbase resolvconf ca-certificates
    e2fsprogs fdisk procps less
    iputils-ping iputils-arping
)

# ---------------------------------------------------------------- helpers
log() { printf '[build-debian12] %s\n' "$*" >&2; }
die() { printf '[build-debian12] error: %s\n' "$*" >&2; exit 1; }

[[ $# -le 1 ]] || die "usage: $0 [OUTPUT_DIR]"
[[ $(id -u) -eq 0 ]] || die "must run as root"

# Build inputs: this script and every file it reads from images/ (none besides itself).
SELF=$(readlink -f -- "${BASH_SOURCE[0]}")
INPUTS=("$SELF")
INPUT_HASH=$(cat -- "${INPUTS[@]}" | sha256sum | cut -d' ' -f1)

OUT=${1:-/var/cache/hvnode/images/${INPUT_HASH}}
OUT=${OUT%/}
[[ -n $OUT ]] || die "empty output directory"

# An output directory is complete when both files are there and the manifest names the
# qcow2 with a sha256 (everything is renamed into place at once, so this is enough).
is_complete() {
    [[ -s $1/$IMAGE_FILE && -s $1/$IMAGE_ID.toml ]] &&
        grep -Eq '^sha256 = "[0-9a-f]{64}"$' "$1/$IMAGE_ID.toml"
}

if is_complete "$OUT"; then
    log "already built: $OUT"
    echo "$OUT"
    exit 0
fi
if [[ -e $OUT ]]; then
    # An empty directory (e.g. created by the caller) is fine; anything else is not ours.
    [[ -d $OUT && -z $(ls -A -- "$OUT") ]] ||
        die "$OUT exists but is not a complete image directory; remove it first"
fi

missing=()
for cmd in mmdebstrap grub-mkstandalone mkfs.vfat mmd mcopy sfdisk mkfs.ext4 e2fsck \
           qemu-img sha256sum unshare truncate dd findmnt; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
[[ -d /usr/lib/grub/x86_64-efi ]] || missing+=("/usr/lib/grub/x86_64-efi (grub-efi-amd64-bin)")
((${#missing[@]} == 0)) || die "missing: ${missing[*]}
install with: apt-get install mmdebstrap grub-efi-amd64-bin mtools dosfstools fdisk e2fsprogs qemu-utils"

# ---------------------------------------------------------------- work area
PARENT=$(dirname -- "$OUT")
mkdir -p -- "$PARENT"
# Staging dir on the same filesystem as OUT so the final rename is atomic.
WORK=$(mktemp -d -- "$PARENT/.build-debian12.XXXXXX")
chmod 0755 "$WORK"   # apt downloads as _apt
cleanup() {
    local rc=$?
    if [[ -n ${HVNODE_KEEP_WORK:-} ]]; then
        log "keeping $WORK (HVNODE_KEEP_WORK)"
        exit "$rc"
    fi
    # mmdebstrap runs in its own mount namespace (unshare -m), so nothing can stay mounted
    # under WORK; still, never recurse into a mount point.
    if findmnt -rn -o TARGET | grep -q -F -- "$WORK/"; then
        log "something is still mounted under $WORK; leaving it in place"
    else
        rm -rf --one-file-system -- "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

TREE=$WORK/tree
STAGE=$WORK/out
mkdir -p -- "$STAGE"
START=$SECONDS

# ---------------------------------------------------------------- root tree
log "mmdebstrap $SUITE -> $TREE"
# The customize hooks run in the finished tree ($1) before mmdebstrap unmounts it.
unshare --mount --propagation private -- \
mmdebstrap --mode=root --variant=minbase --format=directory \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='force-unsafe-io' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='chroot "$1" passwd --lock root >/dev/null' \
    --customize-hook='sed -i "s/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/" "$1/etc/locale.gen"' \
    --customize-hook='chroot "$1" locale-gen >/dev/null' \
    --customize-hook='chroot "$1" apt-get clean' \
    "$SUITE" "$TREE" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main" >&2
log "mmdebstrap done after $((SECONDS - START)) s"

# ---------------------------------------------------------------- configure the tree
[[ -e $TREE/vmlinuz && -e $TREE/initrd.img ]] ||
    die "kernel package did not create /vmlinuz and /initrd.img symlinks"

cat >"$TREE/etc/fstab" <<EOF
# <file system>   <mount point> <type> <options>                  <dump> <pass>
LABEL=${ROOT_LABEL} /             ext4   defaults,errors=remount-ro 0      1
LABEL=${ESP_LABEL}         /boot/efi     vfat   umask=0077,nofail          0      2
EOF
mkdir -p "$TREE/boot/efi"

echo debian >"$TREE/etc/hostname"
cat >"$TREE/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF

# cloud-init's ENI renderer writes /etc/network/interfaces.d/50-cloud-init.
cat >"$TREE/etc/network/interfaces" <<'EOF'
# Interfaces are configured by cloud-init in /etc/network/interfaces.d/.
source /etc/network/interfaces.d/*
EOF
mkdir -p "$TREE/etc/network/interfaces.d"

# Only the NoCloud seed (and the None fallback): no probing of metadata services.
cat >"$TREE/etc/cloud/cloud.cfg.d/99_hvnode.cfg" <<'EOF'
# hvnode: configuration comes from a NoCloud seed (volume label cidata) only.
datasource_list: [ NoCloud, None ]
# The hostname (and fqdn) resolve locally: 127.0.1.1 in /etc/hosts.
manage_etc_hosts: true
# root is the account a VPS customer logs in as: keys given for root are not turned into
# a "Please login as the user debian" message. (The password stays locked until user-data
# sets one.)
disable_root: false
# No GRUB package in the guest (the ESP holds a standalone GRUB): nothing to configure.
grub_dpkg:
  enabled: false
# No DSA host key (sshd in bookworm does not use it).
ssh_genkeytypes: [ rsa, ecdsa, ed25519 ]
EOF
# cloud-init's default on Debian is en_US.UTF-8 (generated above); the system default is
# C.UTF-8, which needs no generation.
echo 'LANG=C.UTF-8' >"$TREE/etc/default/locale"
rm -f "$TREE/etc/cloud/cloud.cfg.d/90_dpkg.cfg"

# Each clone gets its own identity: empty machine-id (systemd fills it on first boot),
# no SSH host keys (cloud-init regenerates them; the drop-in below covers a boot without
# cloud-init).
: >"$TREE/etc/machine-id"
if [[ -e $TREE/var/lib/dbus/machine-id && ! -L $TREE/var/lib/dbus/machine-id ]]; then
    ln -sf /etc/machine-id "$TREE/var/lib/dbus/machine-id"
fi
rm -f "$TREE"/etc/ssh/ssh_host_*
mkdir -p "$TREE/etc/systemd/system/ssh.service.d"
cat >"$TREE/etc/systemd/system/ssh.service.d/hvnode-hostkeys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
EOF

# qemu-guest-agent is started by udev (60-qemu-guest-agent.rules) when the virtio-serial
# port org.qemu.guest_agent.0 appears. With default dependencies it would wait for
# sysinit.target, i.e. for cloud-init's first two stages (tens of seconds under TCG); let it
# answer the host as soon as the local filesystems are mounted.
mkdir -p "$TREE/etc/systemd/system/qemu-guest-agent.service.d"
cat >"$TREE/etc/systemd/system/qemu-guest-agent.service.d/hvnode-early.conf" <<'EOF'
[Unit]
DefaultDependencies=no
After=local-fs.target systemd-journald.socket
Conflicts=shutdown.target
Before=shutdown.target

# The host waits for it to answer: if it ever dies, it comes back.
[Service]
Restart=always
RestartSec=2
EOF

# No LVM in the guest: e2scrub has nothing to do but costs seconds at every boot.
rm -f "$TREE/etc/systemd/system/multi-user.target.wants/e2scrub_reap.service" \
      "$TREE/etc/systemd/system/timers.target.wants/e2scrub_all.timer"

# Sanity: the pieces the guest relies on.
[[ -e $TREE/lib/udev/rules.d/60-qemu-guest-agent.rules ]] ||
    die "qemu-guest-agent udev rule missing"
[[ -L $TREE/etc/systemd/system/multi-user.target.wants/ssh.service ]] ||
    die "ssh.service not enabled"
[[ -L $TREE/etc/systemd/system/cloud-init.target.wants/cloud-init.service ||
   -L $TREE/etc/systemd/system/multi-user.target.wants/cloud-init.service ]] ||
    die "cloud-init not enabled"
grep -q '^root:[!*]' "$TREE/etc/shadow" || die "root is not locked"

# Leave no build-host traces.
rm -rf "$TREE"/var/lib/apt/lists/* "$TREE"/var/cache/apt/*.bin "$TREE"/tmp/* "$TREE"/var/tmp/*
find "$TREE/var/log" -type f -delete
# The dpkg path excludes (docs, man pages, translations) and apt options above apply to
# this build only: packages installed later in the guest are complete.
rm -f "$TREE/etc/dpkg/dpkg.cfg.d/99mmdebstrap" "$TREE/etc/apt/apt.conf.d/99mmdebstrap"

# ---------------------------------------------------------------- bootloader (ESP)
log "grub-mkstandalone"
cat >"$WORK/grub.cfg" <<EOF
set timeout=0
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
insmod part_gpt
insmod ext2
insmod efi_gop
insmod efi_uga
search --no-floppy --label --set=root ${ROOT_LABEL}
linux /vmlinuz ${KERNEL_CMDLINE}
initrd /initrd.img
boot
EOF
grub-mkstandalone -O x86_64-efi -o "$WORK/BOOTX64.EFI" \
    --modules="part_gpt ext2 search_label linux serial terminal efi_gop efi_uga" \
    --install-modules="part_gpt ext2 fat search search_label linux serial terminal efi_gop efi_uga video video_fb normal configfile echo test gzio zstd boot" \
    --locales= --fonts= --themes= \
    "boot/grub/grub.cfg=$WORK/grub.cfg"

ESP_IMG=$WORK/esp.img
truncate -s "${ESP_SIZE_MIB}M" "$ESP_IMG"
mkfs.vfat -n "$ESP_LABEL" "$ESP_IMG" >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$ESP_IMG" ::/EFI ::/EFI/BOOT
mcopy -i "$ESP_IMG" "$WORK/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI

# ---------------------------------------------------------------- root filesystem
# Partition layout (MiB): [0,1) GPT | [1,1+ESP) ESP | [1+ESP, DISK-1) root | backup GPT.
ROOT_START_MIB=$((1 + ESP_SIZE_MIB))
ROOT_SIZE_MIB=$((DISK_SIZE_MIB - ROOT_START_MIB - 1))
ROOT_IMG=$WORK/root.img
log "mkfs.ext4 -d ($ROOT_SIZE_MIB MiB)"
truncate -s "${ROOT_SIZE_MIB}M" "$ROOT_IMG"
mkfs.ext4 -q -F -L "$ROOT_LABEL" -d "$TREE" -E root_owner=0:0 "$ROOT_IMG"
e2fsck -fn "$ROOT_IMG" >/dev/null 2>&1 || die "e2fsck found errors in the new root filesystem"

# ---------------------------------------------------------------- disk
RAW=$WORK/disk.raw
truncate -s "${DISK_SIZE_MIB}M" "$RAW"
sfdisk -q "$RAW" <<EOF
label: gpt
first-lba: 2048
start=1MiB, size=${ESP_SIZE_MIB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system"
start=${ROOT_START_MIB}MiB, size=${ROOT_SIZE_MIB}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
EOF
dd if="$ESP_IMG" of="$RAW" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$ROOT_IMG" of="$RAW" bs=1M seek="$ROOT_START_MIB" conv=notrunc,sparse status=none
rm -f "$ROOT_IMG" "$ESP_IMG"

log "qemu-img convert"
qemu-img convert -f raw -O qcow2 "$RAW" "$STAGE/$IMAGE_FILE"
rm -f "$RAW"
SUM=$(sha256sum "$STAGE/$IMAGE_FILE" | cut -d' ' -f1)
cat >"$STAGE/$IMAGE_ID.toml" <<EOF
id = "$IMAGE_ID"
name = "$IMAGE_NAME"
os = "debian"
description = "Debian 12 (bookworm) with cloud-init and qemu-guest-agent"
file = "$IMAGE_FILE"
format = "qcow2"
sha256 = "$SUM"
EOF
chmod 0644 "$STAGE/$IMAGE_FILE" "$STAGE/$IMAGE_ID.toml"
chmod 0755 "$STAGE"
sync -f "$STAGE/$IMAGE_FILE"

# ---------------------------------------------------------------- publish
[[ -d $OUT ]] && rmdir -- "$OUT" 2>/dev/null || true
if ! mv -T -- "$STAGE" "$OUT"; then
    is_complete "$OUT" || die "could not move the image to $OUT"
    log "another build finished first; using it"
fi
log "built in $((SECONDS - START)) s: $OUT"
echo "$OUT"
exit 0
}
