#!/bin/bash
# The baseline of benches/provision.rs: provisioning one VM the way an operator would
# script it without hvnode. Same template, same devices, same cloud-init content:
#   qemu-img overlay + password hash + cloud-localds seed + virsh define + virsh start.
# Usage: baseline-provision.sh NAME UUID DIR TEMPLATE BRIDGE MAC IP/PREFIX GATEWAY PASSWORD KEY
set -euo pipefail
name=$1 uuid=$2 dir=$3 template=$4 bridge=$5 mac=$6 cidr=$7 gw=$8 password=$9 key=${10}

mkdir -p "$dir"
chmod 0711 "$dir"
qemu-img create -q -f qcow2 -F qcow2 -b "$template" "$dir/disk.qcow2" 4G
hash=$(openssl passwd -6 "$password")
cat > "$dir/meta-data" <<DOC
instance-id: $uuid
local-hostname: $name
DOC
cat > "$dir/user-data" <<DOC
#cloud-config
hostname: $name
disable_root: false
ssh_pwauth: true
users:
  - name: root
    lock_passwd: false
    hashed_passwd: "$hash"
    ssh_authorized_keys: ["$key"]
DOC
cat > "$dir/network-config" <<DOC
version: 2
ethernets:
  eth0:
    match: {macaddress: "$mac"}
    set-name: eth0
    addresses: [$cidr]
    routes: [{to: 0.0.0.0/0, via: $gw}]
DOC
cloud-localds -N "$dir/network-config" "$dir/seed.iso" "$dir/user-data" "$dir/meta-data"
cat > "$dir/domain.xml" <<DOC
<domain type='qemu'>
  <name>$name</name>
  <uuid>$uuid</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>$dir/nvram.fd</nvram>
  </os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap'/>
      <source file='$dir/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$dir/seed.iso'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='bridge'>
      <mac address='$mac'/>
      <source bridge='$bridge'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <graphics type='vnc'><listen type='none'/></graphics>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>
DOC
virsh -q -c qemu:///system define "$dir/domain.xml" >/dev/null
t0=$(date +%s%N)
virsh -q -c qemu:///system start "$name" >/dev/null
echo "start_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
