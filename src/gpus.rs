//! Several GPUs: which configured GPUs a VM takes, which GPU drives the host's display, and
//! what each kind of GPU needs (ARCHITECTURE.md, "Several GPUs").
//!
//! Which GPU a VM takes is read from the VM's own definition (libvirt's `<hostdev>` PCI
//! addresses, [`crate::hook::domain_hostdevs`]), never configured a second time: a `[[gpu]]`
//! says what a card is and where it rests, the VM says which cards it uses.
//!
//! A GPU drives the host's display when the firmware booted on it (`boot_vga` = 1, the
//! console's GPU) or a display server (Xorg, Xwayland, a Wayland compositor, known by its
//! command name) holds one of its nodes. Handing such a GPU takes the host's console and
//! local desktop away, so the hook refuses unless its `[[gpu]]` says `allow_display = true`.
//!
//! Everything here reads only sysfs and values it is given; the hook, `doctor` and
//! `config check` say the results in their own words.

use crate::config::{Config, GpuConfig};
use crate::gpu::Gpu;
use crate::holders::Holder;
use crate::host::Host;
use crate::pci::PciAddress;

/// The configured GPUs among a VM's passed-through devices (any function of a GPU's slot
/// counts), sorted by address: the order their locks are taken in, so that two VMs
/// wanting the same two GPUs never each hold one lock and wait for the other.
pub fn taken_by<'a>(cfg: &'a Config, hostdevs: &[PciAddress]) -> Vec<&'a GpuConfig> {
    let mut gpus: Vec<&GpuConfig> = cfg
        .gpu
        .iter()
        .filter(|g| hostdevs.iter().any(|h| h.same_slot(&g.address)))
        .collect();
    gpus.sort_by_key(|g| g.address);
    gpus
}

/// The configured GPUs (`gpus`: their addresses, the primary first) a VM whose definition
/// passes `passthrough` through takes: the hook's rule ([`crate::hook`]: a VM that passes
/// none of them takes the primary). With one GPU that one, whatever the definition; None
/// when the definition was not read (the surfaces then assume the worst, see
/// [`start_switches`]).
pub fn taken_of(gpus: &[PciAddress], passthrough: Option<&[PciAddress]>) -> Option<Vec<PciAddress>> {
    let primary = *gpus.first()?;
    if gpus.len() == 1 {
        return Some(vec![primary]);
    }
    let passed = passthrough?;
    let taken: Vec<PciAddress> = gpus
        .iter()
        .copied()
        .filter(|g| passed.iter().any(|p| p.same_slot(g)))
        .collect();
    Some(if taken.is_empty() { vec![primary] } else { taken })
}

/// Starting `vm` means switching: another running VM of `vms` takes a GPU `vm` takes
/// ([`taken_of`], from each VM's `passthrough`). A VM whose devices are unknown (this
/// one's or the running one's) counts as sharing, as before the surfaces knew which GPU
/// each VM takes; the switch itself then stops only VMs that share one. The one rule for
/// every surface's "Switch to X" against "Start X" (issue 15).
pub fn start_switches(
    gpus: &[PciAddress],
    vms: &[crate::status::VmStatus],
    vm: &crate::status::VmStatus,
) -> bool {
    let mine = taken_of(gpus, vm.passthrough.as_deref());
    vms.iter()
        .filter(|o| o.state.is_active() && (o.name != vm.name || o.uri != vm.uri))
        .any(|o| match (&mine, taken_of(gpus, o.passthrough.as_deref())) {
            (Some(mine), Some(theirs)) => mine.iter().any(|g| theirs.contains(g)),
            _ => true,
        })
}

/// The passed-through devices that no `[[gpu]]` names (no function of a configured GPU's
/// slot), each once, in the order the definition lists them.
pub fn unnamed(cfg: &Config, hostdevs: &[PciAddress]) -> Vec<PciAddress> {
    let mut out: Vec<PciAddress> = Vec::new();
    for h in hostdevs {
        if cfg.gpu.at(*h).is_none() && !out.contains(h) {
            out.push(*h);
        }
    }
    out
}

/// A PCI function's class code from sysfs (`0x030000` for a VGA controller), None when it
/// cannot be read.
pub fn class_of(host: &Host, address: PciAddress) -> Option<u32> {
    let text = std::fs::read_to_string(host.pci_devices().join(address.to_string()).join("class")).ok()?;
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// Whether a class code is a display controller (base class 0x03: VGA, 3D, other).
pub fn is_display_class(class: u32) -> bool {
    class >> 16 == 0x03
}

/// Whether the firmware booted on this function: its `boot_vga` attribute (present on VGA
/// devices only) reads 1.
pub fn boot_vga(host: &Host, address: PciAddress) -> bool {
    std::fs::read_to_string(host.pci_devices().join(address.to_string()).join("boot_vga"))
        .is_ok_and(|t| t.trim() == "1")
}

/// The command names (`/proc/<pid>/comm`, at most 15 bytes) of display servers: the X
/// server, Xwayland, and Wayland compositors that drive the GPU themselves.
pub const DISPLAY_SERVERS: &[&str] = &[
    "Xorg",
    "X",
    "Xwayland",
    "sway",
    "gnome-shell",
    "kwin_wayland",
    "kwin_x11",
    "weston",
    "mutter",
    "Hyprland",
    "wayfire",
    "labwc",
    "river",
    "cage",
    "niri",
    "gamescope",
    "cosmic-comp",
];

/// The holders that are display servers.
pub fn display_servers(holders: &[Holder]) -> Vec<&Holder> {
    holders
        .iter()
        .filter(|h| DISPLAY_SERVERS.contains(&h.command.as_str()))
        .collect()
}

/// How a GPU drives the host's display, in words for a refusal or doctor, or None.
pub fn display_use(host: &Host, address: PciAddress, holders: &[Holder]) -> Option<String> {
    let servers = display_servers(holders);
    let mut why = Vec::new();
    if boot_vga(host, address) {
        why.push("the firmware booted on it (boot_vga = 1): it shows the host's console".to_owned());
    }
    for s in servers {
        let node = s
            .paths
            .first()
            .map(|p| format!(" holds {}", p.display()))
            .unwrap_or_default();
        why.push(format!(
            "{} (pid {}){node}",
            crate::escape::plain(&s.command),
            s.pid
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// The hook's refusal to hand a display GPU: the reason first, then what the host would
/// lose, then the explicit way to do it anyway.
pub fn display_refusal(gpu: PciAddress, vm: &str, why: &str) -> String {
    format!(
        "handoff: not handing GPU {gpu} to {}: this GPU drives the desktop of this host ({why}). \
         Handing it takes the host's console and local desktop away until the VM stops. \
         Nothing was changed. To hand it anyway, set allow_display = true in its [[gpu]] in /etc/handoff/config.toml.",
        crate::escape::plain(vm)
    )
}

/// Whether a GPU is an Intel integrated GPU: Intel's display controller at 00:02.0, where
/// every Intel iGPU sits.
pub fn is_intel_igpu(g: &Gpu) -> bool {
    let a = g.address;
    g.graphics()
        .is_some_and(|f| f.vendor == 0x8086 && is_display_class(f.class))
        && a.bus == 0
        && a.device == 2
}

/// Whether an NVIDIA GPU is newer than Kepler, the last generation macOS has a driver for
/// (High Sierra's; later macOS has none for NVIDIA at all). By PCI device ID: Kepler ends
/// with GK208 (0x128x); Maxwell starts with GM108 at 0x1340, and every later generation
/// has higher IDs.
pub fn nvidia_newer_than_kepler(vendor: u16, device: u16) -> bool {
    vendor == 0x10de && device >= 0x1340
}

/// The libosinfo id a domain XML records (`<metadata><libosinfo:os id='…'/>`, set by
/// virt-install and virt-manager), e.g. `http://apple.com/macos/14`.
pub fn libosinfo_id(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let metadata = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("metadata"))?;
    metadata
        .descendants()
        .find(|n| n.tag_name().name() == "os" && n.tag_name().namespace() == Some(LIBOSINFO_NS))
        .and_then(|n| n.attribute("id"))
        .map(str::to_owned)
}

const LIBOSINFO_NS: &str = "http://libosinfo.org/xmlns/libvirt/domain/1.0";

/// Whether a libosinfo id is a macOS one: libosinfo files every Apple OS under
/// `http://apple.com/`.
pub fn is_macos_id(id: &str) -> bool {
    id.starts_with("http://apple.com/")
}

/// What a VM that takes an Intel iGPU lacks in its libvirt definition for the guest to
/// drive it, each said plainly; empty when nothing is found missing. Checked: a ROM for the
/// iGPU's `<hostdev>` (`<rom file='…'/>`: UEFI guests need the iGPU's GOP ROM to light a
/// display, QEMU has none of its own) and QEMU's IGD OpRegion (`x-igd-opregion=on`, through
/// `<qemu:commandline>` or `<qemu:override>`: without it the guest driver finds no display
/// outputs). Whether the guest then shows a picture depends on more (the iGPU's
/// generation, the guest's driver), which is not guessed at here.
pub fn igpu_missing(xml: &str, igpu: PciAddress) -> Vec<String> {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return Vec::new();
    };
    let mut missing = Vec::new();
    let hostdev = doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("hostdev"))
        .find(|h| {
            crate::hook::domain_hostdevs(&hostdev_only(xml, h))
                .is_ok_and(|a| a.iter().any(|a| a.same_slot(&igpu)))
        });
    if let Some(h) = hostdev
        && !h
            .children()
            .any(|c| c.has_tag_name("rom") && c.attribute("file").is_some())
    {
        missing.push(format!(
            "its <hostdev> for {igpu} has no <rom file='…'/>: a UEFI guest needs the iGPU's GOP ROM to show a picture"
        ));
    }
    if !xml.contains("x-igd-opregion") {
        missing.push(
            "QEMU's IGD OpRegion is not turned on (x-igd-opregion=on, through <qemu:commandline> or <qemu:override>): \
             without it the guest's driver finds no display outputs"
                .to_owned(),
        );
    }
    missing
}

/// Whether a VM's definition, as [`crate::hypervisor::Description::definition`] gives it,
/// is a macOS guest's: libvirt's domain XML by its libosinfo id ([`is_macos_id`]), a
/// Proxmox VE VM's config (`key: value` lines) by [`pve_is_macos`].
pub fn is_macos_definition(definition: &str) -> bool {
    if definition.trim_start().starts_with('<') {
        libosinfo_id(definition).is_some_and(|id| is_macos_id(&id))
    } else {
        pve_is_macos(&crate::pve::parse_conf(definition))
    }
}

/// Whether a Proxmox VE VM config is a macOS guest. PVE has no macOS `ostype` (its values
/// are Windows, Linux, Solaris and `other`, which macOS guests use along with everything
/// else), so the sign is QEMU's Apple SMC device in `args` (`-device isa-applesmc,osk=…`),
/// without which macOS does not boot.
pub fn pve_is_macos(conf: &std::collections::BTreeMap<String, String>) -> bool {
    conf.get("args").is_some_and(|a| a.contains("isa-applesmc"))
}

/// What a Proxmox VE VM that takes an Intel iGPU lacks in its config for the guest to drive
/// it, each said plainly; empty when nothing is found missing, or when no `hostpciN` names
/// the iGPU directly (a resource mapping `mappings` does not resolve is not guessed at).
/// Checked, as qemu-server builds QEMU's command line (`PVE::QemuServer::PCI`):
/// - the IGD OpRegion: PVE's `legacy-igd=1` on the iGPU's `hostpciN` (QEMU's legacy IGD
///   mode, which sets the OpRegion up), or `-set device.hostpciN.x-igd-opregion=on` in
///   `args` (PVE names the device `hostpciN`): without it the guest's driver finds no
///   display outputs;
/// - a UEFI guest (`bios: ovmf`) needs the iGPU's GOP ROM, `romfile=` (a file in
///   `/usr/share/kvm/`): QEMU has none of its own.
///
/// What PVE itself refuses at start (`legacy-igd` with `vga` other than `none`, with q35,
/// with `x-vga`) it says itself, and is not repeated here.
pub fn pve_igpu_missing(
    conf: &std::collections::BTreeMap<String, String>,
    mappings: &std::collections::BTreeMap<String, Vec<crate::pve::PciSel>>,
    igpu: PciAddress,
) -> Vec<String> {
    let entry = conf.iter().find(|(k, v)| {
        k.strip_prefix("hostpci")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            && crate::pve::parse_hostpci(v).is_some_and(|h| {
                h.devices.iter().any(|d| d.touches(&igpu))
                    || h.mapping
                        .and_then(|m| mappings.get(&m))
                        .is_some_and(|ds| ds.iter().any(|d| d.touches(&igpu)))
            })
    });
    let Some((key, value)) = entry else {
        return Vec::new();
    };
    let option = |name: &str| {
        value
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_owned())
    };
    let mut missing = Vec::new();
    let legacy = option("legacy-igd").is_some_and(|v| matches!(v.as_str(), "1" | "on" | "yes" | "true"));
    let opregion_arg = format!("device.{key}.x-igd-opregion=on");
    if !legacy && !conf.get("args").is_some_and(|a| a.contains(&opregion_arg)) {
        missing.push(format!(
            "its IGD OpRegion is not turned on: neither legacy-igd=1 on {key} (PVE's legacy IGD mode) nor \
             `-set {opregion_arg}` in args; without it the guest's driver finds no display outputs"
        ));
    }
    if conf.get("bios").map(String::as_str) == Some("ovmf") && option("romfile").is_none() {
        missing.push(format!(
            "{key} has no romfile=: a UEFI guest (bios: ovmf) needs the iGPU's GOP ROM to show a picture \
             (a file in /usr/share/kvm/)"
        ));
    }
    missing
}

/// A domain XML holding only one `<hostdev>` element, for [`crate::hook::domain_hostdevs`].
fn hostdev_only(xml: &str, h: &roxmltree::Node) -> String {
    format!("<domain><devices>{}</devices></domain>", &xml[h.range()])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one "Switch to" rule (issue 15): only a VM that takes a GPU a running VM has is
    /// switched to; a VM passing no configured GPU takes the primary; unknown devices and
    /// one GPU count as sharing.
    #[test]
    fn starting_switches_only_when_a_running_vm_shares_a_gpu() {
        use crate::status::{VmState, VmStatus};
        let rtx: PciAddress = "0000:01:00.0".parse().unwrap();
        let igpu: PciAddress = "0000:00:02.0".parse().unwrap();
        let nic: PciAddress = "0000:05:00.0".parse().unwrap();
        let vm = |name: &str, state, devs: Option<Vec<PciAddress>>| VmStatus {
            name: name.into(),
            label: name.into(),
            uri: "test:///default".into(),
            state,
            error: None,
            vmid: None,
            passthrough: devs,
        };
        let gpus = [rtx, igpu];
        let mac = vm("mac", VmState::Running, Some(vec![igpu]));
        let win = vm("win", VmState::Shutoff, Some(vec![rtx, rtx.with_function(1)]));
        let mac2 = vm("mac2", VmState::Shutoff, Some(vec![igpu]));
        let nic_only = vm("nas", VmState::Shutoff, Some(vec![nic]));
        let unread = vm("unread", VmState::Shutoff, None);
        let vms = [
            mac.clone(),
            win.clone(),
            mac2.clone(),
            nic_only.clone(),
            unread.clone(),
        ];
        assert!(!start_switches(&gpus, &vms, &win), "the RTX is free");
        assert!(start_switches(&gpus, &vms, &mac2), "mac has the iGPU");
        assert!(
            !start_switches(&gpus, &vms, &nic_only),
            "no configured GPU: the primary, free"
        );
        assert!(start_switches(&gpus, &vms, &unread), "unknown devices: as before");
        assert!(
            !start_switches(&gpus, &vms, &mac),
            "a VM does not stand in its own way"
        );
        assert_eq!(taken_of(&gpus, Some(&[nic])), Some(vec![rtx]));
        assert_eq!(taken_of(&gpus, None), None);
        // A running VM on the primary by default stands in the way of one on the RTX.
        let on_nic = vm("nas", VmState::Running, Some(vec![nic]));
        assert!(start_switches(&gpus, &[on_nic.clone(), win.clone()], &win));
        assert!(!start_switches(&gpus, &[on_nic, mac2.clone()], &mac2));
        // One GPU: any other running VM, whatever the definitions say.
        assert!(start_switches(&[rtx], &vms, &win));
        assert!(!start_switches(&[rtx], std::slice::from_ref(&win), &win));
    }

    #[test]
    fn kepler_is_the_last_nvidia_generation_macos_drives() {
        // GK104 (GTX 680), GK208 (GT 710): Kepler.
        assert!(!nvidia_newer_than_kepler(0x10de, 0x1180));
        assert!(!nvidia_newer_than_kepler(0x10de, 0x128b));
        // GM108, GA102 (RTX 3090 Ti), GB203 (RTX 5070 Ti).
        assert!(nvidia_newer_than_kepler(0x10de, 0x1340));
        assert!(nvidia_newer_than_kepler(0x10de, 0x2203));
        assert!(nvidia_newer_than_kepler(0x10de, 0x2c05));
        assert!(!nvidia_newer_than_kepler(0x8086, 0x3e92));
    }

    #[test]
    fn the_libosinfo_id_is_read_from_the_metadata() {
        let xml = "<domain type='kvm'><name>mac</name><metadata>\
            <libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>\
            <libosinfo:os id='http://apple.com/macos/14'/></libosinfo:libosinfo></metadata></domain>";
        let id = libosinfo_id(xml).unwrap();
        assert_eq!(id, "http://apple.com/macos/14");
        assert!(is_macos_id(&id));
        assert!(!is_macos_id("http://microsoft.com/win/11"));
        assert_eq!(libosinfo_id("<domain><name>x</name></domain>"), None);
    }

    #[test]
    fn a_pve_igpu_vm_is_told_what_its_config_lacks() {
        let igpu = PciAddress::new(0, 0, 2, 0);
        let none = std::collections::BTreeMap::new();
        let conf = |t: &str| crate::pve::parse_conf(t);
        let bare = conf("name: macos\nbios: ovmf\nhostpci1: 0000:00:02.0,pcie=1\nhostpci0: 0000:01:00\n");
        let m = pve_igpu_missing(&bare, &none, igpu);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].contains("legacy-igd=1 on hostpci1"), "{m:?}");
        assert!(m[0].contains("-set device.hostpci1.x-igd-opregion=on"), "{m:?}");
        assert!(m[1].starts_with("hostpci1 has no romfile="), "{m:?}");
        // Legacy mode has the OpRegion; SeaBIOS needs no GOP ROM.
        let legacy = conf("hostpci0: 0000:00:02.0,legacy-igd=1\nvga: none\n");
        assert_eq!(pve_igpu_missing(&legacy, &none, igpu), Vec::<String>::new());
        // The OpRegion through args must name the iGPU's own hostpciN.
        let other = conf(
            "bios: ovmf\nargs: -set device.hostpci0.x-igd-opregion=on\nhostpci1: 0000:00:02.0,romfile=igd.rom\n",
        );
        assert_eq!(pve_igpu_missing(&other, &none, igpu).len(), 1);
        let right = conf(
            "bios: ovmf\nargs: -set device.hostpci1.x-igd-opregion=on\nhostpci1: 0000:00:02.0,romfile=igd.rom\n",
        );
        assert_eq!(pve_igpu_missing(&right, &none, igpu), Vec::<String>::new());
        // Through a mapping this node resolves; one it does not is not guessed at.
        let mapped = conf("hostpci0: mapping=igd\n");
        assert_eq!(pve_igpu_missing(&mapped, &none, igpu), Vec::<String>::new());
        let maps = crate::pve::parse_pci_mapping("igd\n\tmap node=pve,path=0000:00:02.0\n", "pve");
        assert_eq!(pve_igpu_missing(&mapped, &maps, igpu).len(), 1);
    }

    #[test]
    fn a_pve_macos_vm_is_known_by_its_apple_smc() {
        let conf = |t: &str| crate::pve::parse_conf(t);
        assert!(pve_is_macos(&conf(
            "args: -device isa-applesmc,osk=OSK -smbios type=2\nostype: other\n"
        )));
        assert!(!pve_is_macos(&conf("ostype: other\n")));
        assert!(!pve_is_macos(&conf("ostype: win11\nargs: -cpu host\n")));
        assert!(is_macos_definition(
            "args: -device isa-applesmc,osk=OSK\nhostpci0: 0000:01:00\n"
        ));
        assert!(!is_macos_definition("<domain><name>win11</name></domain>"));
    }

    #[test]
    fn an_igpu_vm_without_rom_or_opregion_is_told_both() {
        let igpu = PciAddress::new(0, 0, 2, 0);
        let bare = "<domain><devices><hostdev mode='subsystem' type='pci'><source>\
            <address domain='0x0000' bus='0x00' slot='0x02' function='0x0'/></source></hostdev></devices></domain>";
        let m = igpu_missing(bare, igpu);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].contains("<rom file="), "{m:?}");
        assert!(m[1].contains("x-igd-opregion"), "{m:?}");
        let full = "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><devices>\
            <hostdev mode='subsystem' type='pci'><source>\
            <address domain='0x0000' bus='0x00' slot='0x02' function='0x0'/></source>\
            <rom file='/usr/share/kvm/igd.rom'/></hostdev></devices>\
            <qemu:commandline><qemu:arg value='-set'/><qemu:arg value='device.hostdev0.x-igd-opregion=on'/>\
            </qemu:commandline></domain>";
        assert_eq!(igpu_missing(full, igpu), Vec::<String>::new());
    }
}
