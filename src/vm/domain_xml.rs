//! The libvirt domain XML of a VM.
//!
//! Built by hand from typed values with every attribute and text node escaped, so that no
//! value can add an element, and every character XML 1.0 can carry reads back exactly (tab,
//! newline and carriage return as references, which parsers would otherwise normalise).
//! The few it cannot carry even escaped (most C0 controls, U+FFFE, U+FFFF) make
//! `try_render` refuse the spec; `render` replaces them with U+FFFD. The golden files in
//! `tests/golden/` show exactly what reaches libvirt; a change here shows up as a diff there.

use std::fmt::Write as _;
use std::path::Path;

use uuid::Uuid;

use crate::config::Accelerator;
use crate::hypervisor::METADATA_NS;

#[derive(Debug, Clone)]
pub struct Nic<'a> {
    pub mac: &'a str,
    pub bridge: &'a str,
    /// Host-side tap name.
    pub tap: &'a str,
}

#[derive(Debug, Clone)]
pub struct DomainSpec<'a> {
    pub id: Uuid,
    pub name: &'a str,
    /// Shown as the domain's title (the VPS hostname).
    pub title: &'a str,
    pub template_id: &'a str,
    pub accelerator: Accelerator,
    pub machine: &'a str,
    /// `<cpu mode=…>`; `None` leaves QEMU's default model.
    pub cpu_mode: Option<&'a str>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub ovmf_code: &'a Path,
    pub ovmf_vars: &'a Path,
    pub nvram: &'a Path,
    pub disk: &'a Path,
    /// The disk's backing file (the shared template of a linked clone) and its format.
    /// libvirt is told the chain, and told not to hand the template to QEMU's user: it
    /// stays root-owned and read-only, so one escaped guest cannot rewrite what every
    /// other clone reads.
    pub backing: Option<(&'a Path, &'a str)>,
    pub seed: &'a Path,
    /// Where virtlogd keeps what the guest writes on its serial console (boot messages,
    /// cloud-init), so that a guest that never comes up can be read after the fact.
    pub console_log: &'a Path,
    pub nics: &'a [Nic<'a>],
}

/// Root ports: ~7 devices of a VM (disks, NICs, balloon, RNG, serial, USB) plus room for
/// hot-plugged NICs.
const ROOT_PORTS: usize = 14;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainXmlError {
    #[error("{field} holds {character:?}, which XML 1.0 cannot carry")]
    Unrepresentable {
        field: &'static str,
        character: char,
    },
}

/// Whether XML 1.0 can carry `c` at all, raw or as a character reference (its `Char`).
pub fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Escapes text for an XML attribute value or text node; it reads back as `s` unless `s`
/// holds a character XML cannot carry (see `xml_char`), which becomes U+FFFD.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if !xml_char(c) => out.push('\u{FFFD}'),
            // Raw, a parser would turn these into spaces (attributes) or CR into LF; DEL and
            // the C1 controls are legal but invisible.
            c if c.is_control() => {
                let _ = write!(out, "&#x{:X};", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// The first value of `spec` holding a character XML 1.0 cannot carry.
fn unrepresentable(spec: &DomainSpec<'_>) -> Option<DomainXmlError> {
    let paths = [
        spec.ovmf_code,
        spec.ovmf_vars,
        spec.nvram,
        spec.disk,
        spec.seed,
        spec.console_log,
    ]
    .map(|p| ("path", p.to_string_lossy()));
    let backing = spec
        .backing
        .map(|(f, fmt)| [("path", f.to_string_lossy()), ("format", fmt.into())]);
    let texts = [
        ("name", spec.name),
        ("title", spec.title),
        ("template_id", spec.template_id),
        ("machine", spec.machine),
        ("cpu_mode", spec.cpu_mode.unwrap_or_default()),
    ];
    let nics = spec
        .nics
        .iter()
        .flat_map(|n| [("mac", n.mac), ("bridge", n.bridge), ("tap", n.tap)]);
    let found = texts
        .into_iter()
        .chain(nics)
        .chain(paths.iter().map(|(f, p)| (*f, p.as_ref())))
        .chain(backing.iter().flatten().map(|(f, p)| (*f, p.as_ref())))
        .find_map(|(field, value)| {
            value
                .chars()
                .find(|c| !xml_char(*c))
                .map(|character| DomainXmlError::Unrepresentable { field, character })
        });
    found
}

/// `render`, refusing a spec that holds a character XML 1.0 cannot carry instead of
/// replacing it: every value in the document reads back exactly.
pub fn try_render(spec: &DomainSpec<'_>) -> Result<String, DomainXmlError> {
    match unrepresentable(spec) {
        Some(e) => Err(e),
        None => Ok(render(spec)),
    }
}

fn p(path: &Path) -> String {
    escape(&path.to_string_lossy())
}

pub fn render(spec: &DomainSpec<'_>) -> String {
    let mut x = String::with_capacity(4096);
    let kind = match spec.accelerator {
        Accelerator::Kvm => "kvm",
        Accelerator::Tcg => "qemu",
    };
    // `write!` into a String cannot fail.
    let _ = writeln!(x, "<domain type='{kind}'>");
    let _ = writeln!(x, "  <name>{}</name>", escape(spec.name));
    let _ = writeln!(x, "  <uuid>{}</uuid>", spec.id);
    let _ = writeln!(x, "  <title>{}</title>", escape(spec.title));
    let _ = writeln!(x, "  <metadata>");
    let _ = writeln!(x, "    <hvnode:vm xmlns:hvnode='{METADATA_NS}'>");
    let _ = writeln!(
        x,
        "      <hvnode:template>{}</hvnode:template>",
        escape(spec.template_id)
    );
    let _ = writeln!(x, "    </hvnode:vm>");
    let _ = writeln!(x, "  </metadata>");
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", spec.memory_mib);
    let _ = writeln!(
        x,
        "  <currentMemory unit='MiB'>{}</currentMemory>",
        spec.memory_mib
    );
    let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", spec.vcpus);
    let _ = writeln!(x, "  <os>");
    let _ = writeln!(
        x,
        "    <type arch='x86_64' machine='{}'>hvm</type>",
        escape(spec.machine)
    );
    let _ = writeln!(
        x,
        "    <loader readonly='yes' type='pflash'>{}</loader>",
        p(spec.ovmf_code)
    );
    let _ = writeln!(
        x,
        "    <nvram template='{}'>{}</nvram>",
        p(spec.ovmf_vars),
        p(spec.nvram)
    );
    let _ = writeln!(x, "    <boot dev='hd'/>");
    let _ = writeln!(x, "  </os>");
    let _ = writeln!(x, "  <features>\n    <acpi/>\n    <apic/>\n  </features>");
    if let Some(mode) = spec.cpu_mode {
        let _ = writeln!(x, "  <cpu mode='{}'/>", escape(mode));
    }
    let _ = writeln!(x, "  <clock offset='utc'/>");
    let _ = writeln!(x, "  <on_poweroff>destroy</on_poweroff>");
    let _ = writeln!(x, "  <on_reboot>restart</on_reboot>");
    let _ = writeln!(x, "  <on_crash>destroy</on_crash>");
    let _ = writeln!(x, "  <devices>");
    let _ = writeln!(x, "    <disk type='file' device='disk'>");
    let _ = writeln!(
        x,
        "      <driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap'/>"
    );
    let _ = writeln!(x, "      <source file='{}'/>", p(spec.disk));
    if let Some((file, format)) = spec.backing {
        let _ = writeln!(x, "      <backingStore type='file'>");
        let _ = writeln!(x, "        <format type='{}'/>", escape(format));
        let _ = writeln!(x, "        <source file='{}'>", p(file));
        let _ = writeln!(x, "          <seclabel model='dac' relabel='no'/>");
        let _ = writeln!(x, "        </source>");
        let _ = writeln!(x, "        <backingStore/>");
        let _ = writeln!(x, "      </backingStore>");
    }
    let _ = writeln!(x, "      <target dev='vda' bus='virtio'/>");
    let _ = writeln!(x, "    </disk>");
    let _ = writeln!(x, "    <disk type='file' device='disk'>");
    let _ = writeln!(x, "      <driver name='qemu' type='raw'/>");
    let _ = writeln!(x, "      <source file='{}'/>", p(spec.seed));
    let _ = writeln!(x, "      <target dev='vdb' bus='virtio'/>");
    let _ = writeln!(x, "      <readonly/>");
    let _ = writeln!(x, "    </disk>");
    for nic in spec.nics {
        let _ = writeln!(x, "    <interface type='bridge'>");
        let _ = writeln!(x, "      <mac address='{}'/>", escape(nic.mac));
        let _ = writeln!(x, "      <source bridge='{}'/>", escape(nic.bridge));
        let _ = writeln!(x, "      <target dev='{}'/>", escape(nic.tap));
        let _ = writeln!(x, "      <model type='virtio'/>");
        let _ = writeln!(x, "    </interface>");
    }
    // PCIe root ports for every device above plus spares, so that NICs can be hot-plugged
    // later (private networks): on q35 each device takes a port of its own. The root complex
    // must be declared before them.
    let _ = writeln!(
        x,
        "    <controller type='pci' index='0' model='pcie-root'/>"
    );
    for _ in 0..ROOT_PORTS {
        let _ = writeln!(x, "    <controller type='pci' model='pcie-root-port'/>");
    }
    let _ = writeln!(
        x,
        "    <serial type='pty'>\n      <log file='{}' append='on'/>\n      <target port='0'/>\n    </serial>",
        p(spec.console_log)
    );
    let _ = writeln!(
        x,
        "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>"
    );
    let _ = writeln!(x, "    <channel type='unix'>");
    let _ = writeln!(
        x,
        "      <target type='virtio' name='org.qemu.guest_agent.0'/>"
    );
    let _ = writeln!(x, "    </channel>");
    // VNC with no listener at all: consoles reach it through libvirt's graphics fd.
    let _ = writeln!(
        x,
        "    <graphics type='vnc' autoport='no'>\n      <listen type='none'/>\n    </graphics>"
    );
    let _ = writeln!(x, "    <video>\n      <model type='vga'/>\n    </video>");
    let _ = writeln!(
        x,
        "    <memballoon model='virtio'>\n      <stats period='5'/>\n    </memballoon>"
    );
    let _ = writeln!(
        x,
        "    <rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>\n    </rng>"
    );
    let _ = writeln!(x, "  </devices>");
    let _ = writeln!(x, "</domain>");
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec<'a>(title: &'a str, nics: &'a [Nic<'a>]) -> DomainSpec<'a> {
        DomainSpec {
            id: "0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c".parse().unwrap(),
            name: "vps-0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c",
            title,
            template_id: "9010",
            accelerator: Accelerator::Tcg,
            machine: "q35",
            cpu_mode: None,
            vcpus: 2,
            memory_mib: 1024,
            ovmf_code: Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"),
            ovmf_vars: Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd"),
            nvram: Path::new("/var/lib/hvnode/vms/0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c/nvram.fd"),
            disk: Path::new("/var/lib/hvnode/vms/0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c/disk.qcow2"),
            backing: Some((
                Path::new("/var/lib/hvnode/images/debian-12-0123456789abcdef.qcow2"),
                "qcow2",
            )),
            seed: Path::new("/var/lib/hvnode/vms/0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c/seed.img"),
            console_log: Path::new(
                "/var/lib/hvnode/vms/0b9f9c1e-3c3a-4f57-9d49-7f1f0c1a2b3c/console.log",
            ),
            nics,
        }
    }

    fn golden(name: &str, actual: &str) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "missing golden file {}; run with UPDATE_GOLDEN=1",
                path.display()
            )
        });
        assert_eq!(actual, expected, "golden file {name} differs");
    }

    #[test]
    fn domain_xml_matches_golden_file() {
        let nics = [Nic {
            mac: "52:54:00:12:34:56",
            bridge: "br-public",
            tap: "vh0b9f9c1e3c3a0",
        }];

        golden(
            "domain-basic.xml",
            &render(&spec("web1.example.com", &nics)),
        );
    }

    #[test]
    fn hostile_values_cannot_add_elements() {
        let nics = [Nic {
            mac: "52:54:00:12:34:56'/><hack/><x a='",
            bridge: "br",
            tap: "t",
        }];

        let xml = render(&spec("</title><devices><hack/></devices>", &nics));

        assert!(!xml.contains("<hack/>"));
        assert!(xml.contains("&lt;/title&gt;"));
    }

    #[test]
    fn control_characters_are_replaced() {
        assert_eq!(escape("a\u{1}b"), "a\u{FFFD}b");
    }

    #[test]
    fn line_breaks_tabs_and_c1_controls_are_character_references() {
        assert_eq!(
            escape("a\tb\nc\rd\u{7f}e\u{85}"),
            "a&#x9;b&#xA;c&#xD;d&#x7F;e&#x85;"
        );
    }

    #[test]
    fn characters_xml_cannot_carry_are_refused_by_try_render() {
        for title in ["a\u{1}b", "\u{fffe}", "\u{ffff}", "\0"] {
            let nics = [];

            let refused = try_render(&spec(title, &nics));

            assert!(
                matches!(
                    refused,
                    Err(DomainXmlError::Unrepresentable { field: "title", .. })
                ),
                "{title:?}"
            );
        }
    }

    #[test]
    fn try_render_is_render_for_representable_specs() {
        let nics = [];
        let spec = spec("a\tb\u{85}é😀", &nics);

        assert_eq!(try_render(&spec), Ok(render(&spec)));
    }
}
