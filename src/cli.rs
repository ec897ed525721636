//! The `handoff` command line's grammar, shared by the two binaries that parse it:
//! `handoff` (links no libvirt: the hook, `blockers`, `bind`, `rebind`, and `status`,
//! `doctor` and `watch` while no VM is configured) and `handoff-vm` (the `handoff-libvirt`
//! crate: the commands that talk to libvirt), which `handoff` runs with its own arguments
//! for those ([`Command::needs_libvirt`]; ARCHITECTURE.md, "Binaries stay light"). Also
//! what both print the same way: logging set-up, errors, JSON, and the commands both run
//! ([`status`], [`doctor`], [`lg_check`](crate::lg_check), [`watch`]) with what only
//! `handoff-vm` can add.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Source};
use anyhow::Context;

#[derive(Parser)]
#[command(
    name = "handoff",
    version,
    about = "Hand one passthrough GPU between the Linux host and a VM, safely, and show who owns it",
    long_about = "Hand one passthrough GPU between the Linux host and a VM, safely, and show who owns it.\n\n\
        Reading the state is unprivileged (sysfs, /proc). Starting a VM goes through libvirt; binding the \
        GPU happens in the libvirt hook, as root.",
    after_help = "Config: $HANDOFF_CONFIG, else ~/.config/handoff/config.toml, else /etc/handoff/config.toml, \
        else built-in defaults. `handoff config check` validates it.\n\
        Exit codes: 0 success, 1 the answer is a problem (blockers: something holds the GPU; doctor: the host is not ready; a handoff failed), 2 usage or config error, 3 (lg) no desktop session reachable to open Looking Glass on, 4 (blockers) not everything could be checked for holders."
)]
pub struct Cli {
    /// Use this config file instead of the usual search (same as HANDOFF_CONFIG=FILE).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// More detail on stderr (-vv for debugging).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Who owns the GPU (each one, when there are several), which VM runs, and what uses it (also installed as `vfio-status`).
    ///
    /// With several `[[gpu]]` entries, every GPU is shown, each with its own verdict; GPU (an
    /// address or a `[[gpu]]` label) narrows it to one. --json is one object: `schema`, the
    /// primary (or named) GPU's `gpu` and `verdict`, `vms`, and `gpus`, a list of every GPU.
    /// "Could take it" (`gpu.candidates`) names the configured VMs that are off and pass the
    /// GPU through (libvirt `<hostdev>`, Proxmox VE `hostpciN`).
    #[command(visible_alias = "vfio-status")]
    Status(GpuArgs),
    /// The processes that would stop a handoff now: what holds the GPU's device nodes, and
    /// what holds its VFIO group `/dev/vfio/<group>` (a VM's QEMU, named with its VM), which
    /// keeps it from returning to the host.
    ///
    /// Exit status 0 when nothing holds the GPU and everything was checked, 1 when something
    /// holds it (a VFIO group user included), 4 when nothing was seen holding it but not everything could be checked
    /// (processes it could not inspect, an unreadable /proc or /proc/iomem, no device node of
    /// the GPU under `[host] dev`): a handoff would be refused then. Unprivileged, it sees your
    /// own processes only and so exits 4 unless one of them holds the GPU; as root it sees all.
    ///
    /// With several `[[gpu]]` entries, every GPU is scanned (exit 1 when any is held, else 4 when
    /// any was not wholly checked); GPU (an address or a `[[gpu]]` label) narrows it to one.
    Blockers(GpuArgs),
    /// Is this host ready for passthrough, and what to fix (exit 0 ready, 1 problems found).
    Doctor(DoctorArgs),
    /// Validate or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Return the GPU to the host driver from whatever state it is in (also installed as
    /// `gpu-rebind-nvidia`). Needs root: `sudo handoff rebind --force` or `pkexec handoff rebind --force`.
    ///
    /// Uses the restore record under `[host] run` when there is one (each function goes back to the
    /// driver it had), else returns the graphics function to `[gpu] host_driver`, but only when the GPU
    /// is away (on vfio-pci or no driver). Refuses while a VM still uses the GPU, and while a
    /// process holds a function it would unbind from a host driver. As root (--force) it reads
    /// only the root-owned /etc/handoff/config.toml.
    #[command(visible_alias = "gpu-rebind-nvidia")]
    Rebind(RebindArgs),
    /// Move the GPU to vfio-pci by hand, as the hook does before a VM starts (root).
    ///
    /// Refuses, changing nothing, while any process holds the GPU.
    Bind(BindArgs),
    /// Install (or with --uninstall remove) the libvirt hook that guards and binds the GPU
    /// (also installed as `install-hooks`). Idempotent; needs root.
    ///
    /// Puts a small shim at /etc/libvirt/hooks/qemu.d/handoff that runs `handoff hook`, never
    /// touching an existing /etc/libvirt/hooks/qemu, and makes libvirtd re-read its hooks (SIGHUP).
    InstallHooks(InstallHooksArgs),
    /// Install (or with --uninstall remove) the holder publisher: a systemd system unit that
    /// runs `handoff publish-holders` as root. Optional; needs root.
    ///
    /// A tray, bar or `handoff status` run by a user cannot see other users' processes, so
    /// alone it never says the GPU is free. The publisher watches the GPU's device nodes
    /// (inotify: asleep while nothing opens or closes them) and writes who holds them
    /// (pid, command, user, unit, nodes; nothing more) to holders.json in `[host] run`,
    /// readable by all, which every surface then uses. Puts
    /// /etc/systemd/system/handoff-publisher.service in place and enables it; --uninstall
    /// disables it and removes exactly that file and holders.json.
    InstallPublisher(InstallPublisherArgs),
    /// Run by the unit `install-publisher` puts in place, as root: watch the GPUs' nodes and
    /// keep holders.json in `[host] run` current. Not for people.
    #[command(hide = true)]
    PublishHolders {
        /// Read this system config instead of /etc/handoff/config.toml (tests).
        #[arg(long, hide = true, value_name = "FILE")]
        system_config: Option<PathBuf>,
    },
    /// Start a VM (default: the first `[[vm]]`) with the GPU (also installed as `windows-start`).
    ///
    /// Checks first: nothing of yours holds the GPU, and no other configured VM has it.
    /// Then starts the domain, waits until it runs and says where the GPU went. When the
    /// libvirt hook refuses (something holds the GPU), prints its list. Exit 0 running
    /// (also when it already was), 1 refused or failed, nothing started.
    #[command(visible_alias = "windows-start")]
    Start(StartArgs),
    /// Shut a VM down gracefully (ACPI) and wait for the GPU to come back (also installed as
    /// `windows-stop`).
    ///
    /// Waits up to the VM's shutdown_timeout_s (or --timeout); exit 1 when the guest did
    /// not stop, saying how to force it. --force turns it off at once (unsaved work in
    /// the VM is lost).
    #[command(visible_alias = "windows-stop")]
    Stop(StopArgs),
    /// Give the GPU to another VM: stop the VM that has it (gracefully, unless --force),
    /// wait for the GPU, start VM. Exit 1 with the step that failed.
    Switch(SwitchArgs),
    /// A VM's state, uptime, vCPUs, memory, passed-through PCI devices, Looking Glass
    /// device and IP (also installed as `vm-health`).
    VmHealth(VmHealthArgs),
    /// Run by libvirtd as /etc/libvirt/hooks/qemu.d/handoff: `<domain> <operation> <sub-op> <extra>`,
    /// domain XML on stdin. Not for people; `handoff install-hooks` sets it up.
    Hook {
        /// What libvirtd passes.
        #[arg(num_args = 0.., allow_hyphen_values = true)]
        args: Vec<String>,
        /// Read this system config instead of /etc/handoff/config.toml (tests).
        #[arg(long, hide = true, value_name = "FILE")]
        system_config: Option<PathBuf>,
    },
    /// What Proxmox VE runs as the VMs' hookscript, as root: `<vmid> <phase>`.
    ///
    /// `install-hooks --pve` puts a snippet that calls this in a snippets storage and sets
    /// it as the configured VMs' hookscript. In `pre-start` it refuses (exit 1; PVE aborts
    /// the start and shows the reason in the task log) when another running VM passes the
    /// same GPU through, or when something holds a GPU that is on a host driver; otherwise it
    /// hands the GPU to vfio-pci. `post-stop` returns it. See docs/proxmox.md.
    #[command(hide = true)]
    PveHook {
        vmid: u32,
        phase: String,
        /// Read this system config instead of /etc/handoff/config.toml (tests).
        #[arg(long, hide = true, value_name = "FILE")]
        system_config: Option<PathBuf>,
        /// Read PVE's files (etc/pve, var/run/qemu-server) under this root instead of / (tests).
        #[arg(long, hide = true, value_name = "DIR")]
        pve_root: Option<PathBuf>,
        /// This node's name, for resource mappings (default: the host name).
        #[arg(long, hide = true)]
        node: Option<String>,
    },
    /// Open Looking Glass on its i3 workspace, or focus it when it is already open.
    ///
    /// Works from SSH: finds the desktop's i3 through I3SOCK, `/run/user/<uid>/i3/ipc-socket.*`,
    /// or the X root window (DISPLAY), and has i3 start the client in the desktop session.
    /// Exit 0 opened or focused, 1 failed, 3 no desktop session reachable from here.
    Lg(LgArgs),
    /// Can Looking Glass work: shared memory present, sized as the VM's device, readable and
    /// writable by you, kvmfr loaded when used, the client installed (also installed as `lg-test`).
    ///
    /// Exit 0 when all of that holds, 1 otherwise; each failure says how to fix it.
    LgTest(LgTestArgs),
    /// Install (or with --uninstall remove) your session's pieces (also installed as `install-services`):
    /// the tray's systemd user unit, an XDG autostart entry for it, a "Windows" launcher, and
    /// with --lg-autostart a unit that opens Looking Glass when the VM starts. Idempotent.
    InstallServices(InstallServicesArgs),
    /// Find the GPUs and the VMs that pass them through, and write the system config
    /// /etc/handoff/config.toml (root), install the hook and your session's pieces.
    ///
    /// Proposes which GPUs to hand (not the one driving the host's display, unless
    /// --allow-display or you say so when asked), the VMs that pass each through (libvirt
    /// domains' `<hostdev>`, Proxmox VE VMs' hostpciN: through the API with --pve-url, or PVE's
    /// files on the node) with their labels, and shows each GPU's IOMMU group and driver.
    /// Stops before writing anything when something blocks passthrough (IOMMU off, a shared
    /// IOMMU group, no VM passing a GPU through), saying what to do; never edits a VM.
    ///
    /// Run again, it shows what changed on the machine and only adds what is new to the
    /// file (your edits stay as they are); an unchanged machine changes nothing. On a
    /// terminal it asks before writing; --yes for scripts; --dry-run writes nothing.
    /// Exit 0 done (or nothing to change), 1 blocked or declined, 2 usage or config error.
    Setup(Box<SetupArgs>),
    /// Print one line per change as it happens: driver binds of the GPU's functions, VM
    /// lifecycle events, the hook's state file, libvirtd going away and coming back.
    ///
    /// What the tray and `handoff-block --watch` listen to; no polling. Runs until
    /// interrupted (or stdout closes).
    Watch(JsonFlag),
    /// Try handoff without a passthrough GPU: a simulated host (kernel sysfs with an RTX
    /// 3090 Ti, libvirt's test driver with a "Windows" VM, a process holding the GPU), the
    /// tray on it when there is a display, and the bar block's line per change here.
    ///
    /// Without a display, or with --script, it walks through the handoff itself: start
    /// (refused, naming the process), terminate the process, start (GPU to vfio-pci), a
    /// macOS VM taking the iGPU meanwhile and giving it back, stop (GPU back to nvidia).
    /// Needs root (a FUSE mount). Ctrl-C ends it and removes all of
    /// it: children, mount, temporary directory.
    Demo(DemoArgs),
    /// The demo's GPU user (`cuda-training`): holds NODE open until killed.
    #[command(hide = true)]
    DemoHolder { node: PathBuf },
    /// The libvirt side of `handoff-tray`: reads requests as JSON lines on stdin, writes
    /// VM changes and replies as JSON lines on stdout, ends when stdin closes. The tray
    /// runs it so that it links no libvirt itself (see the library's `agent` module).
    #[command(name = "__agent", hide = true)]
    Agent,
}

#[derive(Args)]
pub struct SetupArgs {
    /// Do not ask: write, install and add what is new (your edits to the file are kept).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Print what was found, the config it would write and the steps it would take; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the plan as one JSON object (with --dry-run, or with --yes).
    #[arg(long)]
    pub json: bool,
    /// Also hand GPUs that drive this host's display (its console and local desktop go
    /// with them while a VM runs).
    #[arg(long)]
    pub allow_display: bool,
    /// Hand only this GPU (its address); repeat for several. Default: every GPU some VM
    /// passes through that does not drive the display.
    #[arg(long = "gpu", value_name = "ADDRESS")]
    pub gpus: Vec<crate::pci::PciAddress>,
    /// The libvirt URI whose domains to look at.
    #[arg(long, default_value = "qemu:///system", value_name = "URI")]
    pub uri: String,
    /// Do not look at libvirt (a Proxmox VE node has none; where /etc/pve exists this is the default).
    #[arg(long)]
    pub no_libvirt: bool,
    /// Do not install the libvirt hook or the PVE hookscript.
    #[arg(long)]
    pub no_hooks: bool,
    /// Do not run install-services for you.
    #[arg(long)]
    pub no_services: bool,
    /// Proxmox VE's API (https://HOST:8006): its VMs and their hostpciN; written as `[proxmox]`.
    #[arg(long, value_name = "URL")]
    pub pve_url: Option<String>,
    /// With --pve-url: the API token's id, user@realm!tokenid.
    #[arg(long, requires = "pve_url", value_name = "TOKEN")]
    pub pve_token: Option<String>,
    /// With --pve-url: the file holding the token's secret (owner-only).
    #[arg(long, requires = "pve_url", value_name = "FILE")]
    pub pve_token_secret_file: Option<PathBuf>,
    /// With --pve-url: the node certificate's SHA-256 fingerprint (`pvenode cert info`).
    #[arg(long, requires = "pve_url", value_name = "SHA256")]
    pub pve_fingerprint: Option<String>,
    /// With --pve-url: a CA file for the node's certificate instead of the fingerprint.
    #[arg(long, requires = "pve_url", value_name = "FILE")]
    pub pve_ca_file: Option<PathBuf>,
    /// Write this system config instead of /etc/handoff/config.toml (tests).
    #[arg(long, hide = true, value_name = "FILE")]
    pub system_config: Option<PathBuf>,
    /// libvirt's hooks directory (tests).
    #[arg(long, hide = true, value_name = "DIR")]
    pub hooks_dir: Option<PathBuf>,
    /// PVE's files under this root instead of / (tests).
    #[arg(long, hide = true, value_name = "DIR")]
    pub pve_root: Option<PathBuf>,
    /// `[host] sysfs` to read and write (tests, the demo).
    #[arg(long, hide = true, value_name = "DIR")]
    pub sysfs: Option<PathBuf>,
    /// `[host] dev` (tests, the demo).
    #[arg(long, hide = true, value_name = "DIR")]
    pub dev: Option<PathBuf>,
    /// `[host] run` (tests, the demo).
    #[arg(long, hide = true, value_name = "DIR")]
    pub run: Option<PathBuf>,
}

impl SetupArgs {
    /// Where PVE's files are: `--pve-root`, else `/`.
    pub fn pve_root(&self) -> PathBuf {
        self.pve_root.clone().unwrap_or_else(|| PathBuf::from("/"))
    }

    /// Whether libvirt is looked at: not with --no-libvirt, nor on a Proxmox VE node.
    pub fn uses_libvirt(&self) -> bool {
        !self.no_libvirt && !self.pve_root().join("etc/pve").is_dir()
    }
}

#[derive(Args)]
pub struct DemoArgs {
    /// Do the clicks itself and exit (the default without a display is to wait for Ctrl-C).
    #[arg(long)]
    pub script: bool,
    /// Do not start handoff-tray even when there is a display.
    #[arg(long)]
    pub no_tray: bool,
}

#[derive(Args)]
pub struct LgTestArgs {
    /// The VM to check (default: the first `[[vm]]`).
    #[arg(long)]
    pub vm: Option<String>,
    /// Read the domain XML from this file instead of asking libvirt.
    #[arg(long, value_name = "FILE")]
    pub xml: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct InstallServicesArgs {
    /// Remove exactly what install-services installed.
    #[arg(long)]
    pub uninstall: bool,
    /// Say what would change without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Also install handoff-lg-autostart.service (opens Looking Glass when the VM starts).
    #[arg(long)]
    pub lg_autostart: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The directory holding handoff and handoff-tray (default: this binary's).
    #[arg(long, hide = true, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct LgArgs {
    /// Seconds to wait for a started client's window.
    #[arg(long, value_name = "SECS", default_value_t = crate::lg::WINDOW_WAIT.as_secs())]
    pub wait: u64,
    /// Print what happened as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep running: open Looking Glass each time the VM starts (libvirt lifecycle events), and
    /// hold a logind sleep inhibitor while it runs. What handoff-lg-autostart.service runs.
    #[arg(long)]
    pub on_vm_start: bool,
}

#[derive(Args)]
pub struct StartArgs {
    /// The `[[vm]]` name or label (default: the first).
    pub vm: Option<String>,
    /// Instead of naming a VM: start the first `[[vm]]` whose definition passes this GPU
    /// through (its address or label; a VM passing none of the `[[gpu]]`s takes the primary).
    /// The bar block's right click on a GPU runs this.
    #[arg(long, value_name = "GPU", conflicts_with = "vm")]
    pub gpu: Option<String>,
    /// First end what holds the GPU: your processes (SIGTERM, then wait), their systemd
    /// units (systemctl [--user] stop), their containers (docker/podman stop). Lists
    /// them and asks on a terminal; never another user's process unless run as root.
    #[arg(long)]
    pub stop_holders: bool,
    /// With --stop-holders: do not ask (for scripts and SSH without a terminal).
    #[arg(long, short = 'y', requires = "stop_holders")]
    pub yes: bool,
    /// Print the outcome as one JSON object (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StopArgs {
    /// The `[[vm]]` name or label (default: the first).
    pub vm: Option<String>,
    /// Turn the VM off at once (libvirt destroy): unsaved work in the VM is lost.
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for the graceful shutdown (default: the VM's shutdown_timeout_s).
    #[arg(long, value_name = "S", conflicts_with = "force")]
    pub timeout: Option<u64>,
    /// Print the outcome as one JSON object (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SwitchArgs {
    /// The `[[vm]]` to give the GPU to (name or label).
    pub vm: String,
    /// Turn the VM that has the GPU off at once instead of shutting it down: its unsaved work is lost.
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for the graceful shutdown (default: that VM's shutdown_timeout_s).
    #[arg(long, value_name = "S", conflicts_with = "force")]
    pub timeout: Option<u64>,
    /// Print the outcome as one JSON object (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VmHealthArgs {
    /// The `[[vm]]` name or label (default: the first).
    pub vm: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DoctorArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// libvirt's hooks directory to check (tests).
    #[arg(long, hide = true, value_name = "DIR")]
    pub hooks_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct InstallPublisherArgs {
    /// Remove exactly what install-publisher installed.
    #[arg(long)]
    pub uninstall: bool,
    /// Say what would change without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the steps as JSON.
    #[arg(long)]
    pub json: bool,
    /// Install under this directory instead of / and run no systemctl (tests).
    #[arg(long, hide = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Read this system config instead of /etc/handoff/config.toml (tests).
    #[arg(long, hide = true, value_name = "FILE")]
    pub system_config: Option<PathBuf>,
}

#[derive(Args)]
pub struct InstallHooksArgs {
    /// Remove exactly what install-hooks installed.
    #[arg(long)]
    pub uninstall: bool,
    /// Say what would change without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// libvirt's hooks directory (tests).
    #[arg(long, hide = true, value_name = "DIR")]
    pub hooks_dir: Option<PathBuf>,
    /// On a Proxmox VE host: put the hookscript in a snippets storage and set it on the
    /// configured VMs (`[[vm]] vmid`) instead of installing libvirt's hook. Never replaces
    /// a VM's other hookscript; says how to combine them. See docs/proxmox.md.
    #[arg(long)]
    pub pve: bool,
    /// With --pve: the storage for the snippet (default: the first directory storage
    /// whose content includes snippets).
    #[arg(long, requires = "pve", value_name = "STORAGE")]
    pub storage: Option<String>,
    /// With --pve: guard these VMs (default: every `[[vm]]` with a vmid in the config).
    #[arg(long = "vmid", requires = "pve", value_name = "VMID")]
    pub vmids: Vec<u32>,
    /// With --pve: PVE's files under this root instead of / (tests).
    #[arg(long, hide = true, requires = "pve", value_name = "DIR")]
    pub pve_root: Option<PathBuf>,
}

#[derive(Args)]
pub struct RebindArgs {
    /// Required: this rewrites driver bindings as root.
    #[arg(long)]
    pub force: bool,
    /// Print the steps without doing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Rebind even though a VM still holds the GPU. The VM loses its GPU and will likely crash.
    #[arg(long)]
    pub even_if_vm_runs: bool,
    /// Return this GPU (a `[[gpu]]` address; default: the primary one), and refuse unless the
    /// config has it. The tray passes it so that pkexec's password prompt names the GPU that
    /// will be touched.
    #[arg(long, value_name = "ADDRESS")]
    pub gpu: Option<crate::pci::PciAddress>,
}

#[derive(Args)]
pub struct BindArgs {
    /// Print the steps without doing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Record this VM as the GPU's holder.
    #[arg(long)]
    pub vm: Option<String>,
    /// Which GPU, with several `[[gpu]]` entries: its address or label (default: the primary one).
    #[arg(long, value_name = "GPU")]
    pub gpu: Option<String>,
}

#[derive(Args)]
pub struct GpuArgs {
    /// Only this GPU: its address (0000:01:00.0, or 01:00.0) or its `[[gpu]]` label.
    pub gpu: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct JsonFlag {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Check a config file (default: the one handoff would use); exit 2 with the error if broken.
    Check {
        /// The file to check.
        file: Option<PathBuf>,
    },
    /// Print the effective configuration, defaults filled in, and where it came from.
    Show,
}

impl Command {
    /// Whether this command talks to libvirt, and so runs in `handoff-vm`. `has_vms`
    /// answers whether the config lists a VM; it is asked only for the commands that need
    /// libvirt only then (`status`, `doctor`, `watch`, and `config check`, which reads the
    /// VMs' definitions).
    pub fn needs_libvirt(&self, has_vms: impl FnOnce() -> bool) -> bool {
        match self {
            Command::Start(_)
            | Command::Stop(_)
            | Command::Switch(_)
            | Command::VmHealth(_)
            | Command::Demo(_)
            | Command::DemoHolder { .. }
            | Command::Agent => true,
            Command::Lg(a) => a.on_vm_start,
            Command::Setup(a) => a.uses_libvirt(),
            Command::LgTest(a) => a.xml.is_none(),
            Command::Status(_)
            | Command::Doctor(_)
            | Command::Watch(_)
            | Command::Config(ConfigCommand::Check { .. }) => has_vms(),
            Command::Blockers(_)
            | Command::Config(ConfigCommand::Show)
            | Command::PveHook { .. }
            | Command::Rebind(_)
            | Command::Bind(_)
            | Command::InstallHooks(_)
            | Command::InstallPublisher(_)
            | Command::PublishHolders { .. }
            | Command::Hook { .. }
            | Command::InstallServices(_) => false,
        }
    }
}

/// The error and its causes, each said once: our errors already put their cause in their
/// own message ("cannot read X: No such file"), and anyhow's `{:#}` would repeat it.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text += ": ";
            text += &cause;
        }
    }
    text
}

/// Logging to stderr at the level `-v`/`-q` ask for (`HANDOFF_LOG` overrides).
pub fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HANDOFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: as the hook, stderr becomes
        // libvirt's error text, and in a log or a pipe they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

/// The config of an unprivileged command (see [`Config::load_cli`]).
pub fn load_config(explicit: Option<PathBuf>) -> anyhow::Result<(Config, Source)> {
    Ok(Config::load_cli(explicit)?)
}

pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `handoff status [GPU]`: every GPU (or the one named), each with its verdict. `probe`
/// asks the hypervisor about a VM (never called without VMs).
pub fn status(
    cfg: &Config,
    args: &GpuArgs,
    probe: &mut dyn FnMut(&crate::config::VmConfig) -> crate::status::VmStatus,
) -> anyhow::Result<ExitCode> {
    let each = crate::status::collect_each(cfg, args.gpu.as_deref(), probe)?;
    let report = crate::status::AllReport::new(cfg, &each).context("no GPU to show")?;
    if args.json {
        print_json(&report)?;
    } else {
        print!("{}", report.report_text(&each));
    }
    Ok(ExitCode::SUCCESS)
}

/// `config check`'s look at the VMs' definitions (`describe` gives one): devices they pass
/// through that no `[[gpu]]` names, a macOS VM given an NVIDIA card it has no driver for.
/// Printed only when there is something to say; never a failure of the check (the file
/// itself is fine), and a VM whose definition cannot be read is passed over (`handoff
/// doctor` reports it).
pub fn config_check_vms(
    cfg: &Config,
    describe: &mut dyn FnMut(&crate::config::VmConfig) -> Result<crate::hypervisor::Description, String>,
) -> ExitCode {
    let checks = crate::doctor::vm_definition_checks(cfg, describe);
    print!("{}", crate::doctor::render_checks(&checks));
    ExitCode::SUCCESS
}

/// `handoff doctor`: `extra` are the checks of what only `handoff-vm` links (the VMs
/// through libvirt, logind's sleep inhibitor).
pub fn doctor(
    cfg: &Config,
    source: &Source,
    args: &DoctorArgs,
    extra: Vec<crate::doctor::Check>,
) -> anyhow::Result<ExitCode> {
    let report = crate::doctor::run(
        cfg,
        source,
        &crate::doctor::Caller::current(),
        args.hooks_dir
            .as_deref()
            .unwrap_or(std::path::Path::new(crate::hook_install::DEFAULT_HOOKS_DIR)),
        extra,
    );
    if args.json {
        print_json(&report)?;
    } else {
        print!("{}", report.render_text());
    }
    Ok(ExitCode::from(report.exit_code() as u8))
}

/// `handoff lg-test`: `describe` gives the VM's definition when no `--xml` file was given.
pub fn lg_test(
    cfg: &Config,
    args: &LgTestArgs,
    describe: impl FnOnce(&crate::config::VmConfig) -> Result<String, String>,
) -> anyhow::Result<ExitCode> {
    use crate::lg_check;
    let vm = match cfg.vm(args.vm.as_deref()) {
        Some(v) => v.clone(),
        None => anyhow::bail!(
            "no [[vm]] named {:?} in the config",
            args.vm.as_deref().unwrap_or("(first)")
        ),
    };
    let xml = match &args.xml {
        Some(f) => std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display())),
        None => describe(&vm),
    };
    let inputs = lg_check::Inputs {
        xml,
        vm: vm.name.clone(),
        caller: lg_check::Caller::current(),
        path: std::env::var_os("PATH"),
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "(unknown)".into()),
    };
    let report = lg_check::run(cfg, &inputs);
    if args.json {
        print_json(&report)?;
    } else {
        print!("{}", report.render_text());
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `handoff watch`: the live change stream, one line (or JSON object) per change.
pub fn watch(cfg: &Config, sources: crate::live::Sources, json: bool) -> anyhow::Result<ExitCode> {
    let watcher = crate::live::Watcher::new(cfg, sources)?;
    crate::live::write_changes(
        std::iter::from_fn(|| watcher.recv().ok()),
        json,
        &mut std::io::stdout().lock(),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// What lists a libvirt URI's domains with what they pass through (`handoff-vm` gives one;
/// `handoff` has none: it links no libvirt).
pub type ListLibvirt<'a> =
    &'a mut dyn FnMut(&str, &mut Vec<String>) -> Result<Vec<crate::setup::FoundVm>, String>;

/// `handoff setup`: find, plan, show, ask, write, install ([`crate::setup`]). `handoff` is
/// the binary the hook runs (the one installed beside `handoff-vm`).
pub fn setup(
    explicit: Option<PathBuf>,
    args: &SetupArgs,
    libvirt: Option<ListLibvirt<'_>>,
    handoff: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    use crate::config::ProxmoxConfig;
    use crate::setup;
    use std::io::IsTerminal;

    let path = args
        .system_config
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::config::SYSTEM_CONFIG));
    if explicit.is_some() {
        anyhow::bail!(
            "setup writes the system config {}; --config names another file (tests use the hidden --system-config)",
            path.display()
        );
    }
    let existing = setup::read_existing(&path)?;
    let there = existing.as_deref().and_then(|t| Config::parse(t, &path).ok());
    let mut host = there.as_ref().map(|c| c.host.clone()).unwrap_or_default();
    for (flag, root) in [
        (&args.sysfs, &mut host.sysfs),
        (&args.dev, &mut host.dev),
        (&args.run, &mut host.run),
    ] {
        if let Some(p) = flag {
            *root = p.clone();
        }
    }
    let proxmox = match &args.pve_url {
        Some(url) => Some(ProxmoxConfig {
            url: url.clone(),
            token: args
                .pve_token
                .clone()
                .context("--pve-url needs --pve-token user@realm!tokenid")?,
            token_secret_file: args
                .pve_token_secret_file
                .clone()
                .context("--pve-url needs --pve-token-secret-file FILE")?,
            fingerprint: args.pve_fingerprint.clone(),
            ca_file: args.pve_ca_file.clone(),
            node: None,
            poll_interval_s: 5,
        }),
        None => there.as_ref().and_then(|c| c.proxmox.clone()),
    };

    let (iommu_groups, kernel_flags) = setup::discover_iommu(&host);
    let mut machine = setup::Machine {
        iommu_groups,
        kernel_flags,
        gpus: setup::discover_gpus(&host),
        ..Default::default()
    };
    let mut notes = Vec::new();
    if let Some(list) = libvirt {
        match list(&args.uri, &mut notes) {
            Ok(vms) => machine.vms.extend(vms),
            Err(e) => notes.push(format!("cannot list the libvirt domains at {}: {e}", args.uri)),
        }
    }
    if let Some(p) = &proxmox {
        let cfg = Config {
            proxmox: Some(p.clone()),
            ..Config::default()
        };
        let found = crate::hypervisor::piped::Piped::spawn(
            &crate::hypervisor::piped::Piped::pve_server(),
            &cfg,
            &p.url,
        )
        .map_err(|e| e.to_string())
        .and_then(|mut pve| setup::discover_vms(&mut pve, &p.url, &mut notes));
        match found {
            Ok(vms) => machine.vms.extend(vms),
            Err(e) => notes.push(format!("cannot list Proxmox VE's VMs at {}: {e}", p.url)),
        }
    }
    let pve = crate::pve::PveHost {
        root: args.pve_root(),
        ..crate::pve::PveHost::system()
    };
    let on_node = pve.root.join("etc/pve").is_dir();
    if on_node && proxmox.is_none() {
        machine.pve_node_vms = setup::discover_pve_files(&pve);
    }
    machine.notes = notes;

    let mut opts = setup::Options {
        allow_display: args.allow_display,
        allowed: Vec::new(),
        gpus: args.gpus.clone(),
        host,
        proxmox,
    };
    let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let interactive = terminal && !args.yes && !args.dry_run && !args.json;
    let ask = |q: &str| -> bool {
        use std::io::{BufRead, Write};
        print!("{q} [y/N] ");
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        matches!(answer.trim(), "y" | "Y" | "yes")
    };
    let mut plan = setup::plan(machine.clone(), &opts, existing.as_deref());
    if interactive && !args.allow_display {
        // A display GPU that a VM passes through: asked, never assumed.
        for c in &plan.gpus {
            if let Some(d) = &c.gpu.display
                && !c.vms.is_empty()
                && !c.hand
                && args.gpus.is_empty()
                && ask(&format!(
                    "{} drives this host's display ({d}), and {} want(s) it. Hand it to VMs anyway (the host loses its console and local desktop while one runs)?",
                    c.gpu.address,
                    c.vms.join(", ")
                ))
            {
                opts.allowed.push(c.gpu.address);
            }
        }
        if !opts.allowed.is_empty() {
            plan = setup::plan(machine, &opts, existing.as_deref());
        }
    }

    let steps = setup_steps(&plan, args, &path, on_node)?;
    if args.json {
        print_json(&serde_json::json!({
            "system_config": path,
            "plan": plan,
            "unchanged": plan.unchanged(),
            "steps": steps,
            "dry_run": args.dry_run,
        }))?;
        if plan.blocked() {
            return Ok(ExitCode::from(1));
        }
        if args.dry_run || !args.yes {
            return Ok(ExitCode::SUCCESS);
        }
    } else {
        print!("{}", plan.render_found());
    }
    if plan.blocked() {
        return Ok(ExitCode::from(1));
    }
    let say = |line: &str| {
        if !args.json {
            println!("{line}");
        }
    };
    if args.dry_run {
        if plan.unchanged() {
            say(&format!("\n{}: nothing to change", path.display()));
        } else if plan.existing.is_some() {
            say(&format!("\nIt would add to {}:", path.display()));
            for l in &plan.diff {
                say(&format!("  {l}"));
            }
        } else {
            say(&format!("\nThe config it would write to {}:\n", path.display()));
            say(plan.text.trim_end());
        }
        say("\nThen it would:");
        for s in &steps {
            say(&format!("  {s}"));
        }
        say("\n(dry run: nothing was written)");
        return Ok(ExitCode::SUCCESS);
    }

    if !plan.unchanged() {
        if plan.existing.is_some() {
            say(&format!(
                "\nTo add to {} (nothing there is changed or removed):",
                path.display()
            ));
            for l in &plan.diff {
                say(&format!("  {l}"));
            }
        } else {
            say(&format!("\nThe config for {}:\n", path.display()));
            say(plan.text.trim_end());
        }
    }
    say("\nSteps:");
    for s in &steps {
        say(&format!("  {s}"));
    }
    if !args.yes {
        if !interactive {
            anyhow::bail!(
                "not on a terminal, so nothing was written: run `handoff setup --yes` to apply, or --dry-run to look"
            );
        }
        if !ask("\nGo ahead?") {
            println!("Nothing was written.");
            return Ok(ExitCode::from(1));
        }
    }
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "{} is the root-owned system config the hook trusts: run `sudo handoff setup` (nothing was written)",
            path.display()
        );
    }
    let cfg = plan.config()?;
    if plan.unchanged() {
        say(&format!("{}: nothing to change", path.display()));
    } else {
        setup::write_config(&path, &plan.text)?;
        Config::load_system(&path)?;
        say(&format!(
            "{}: {}",
            path.display(),
            if plan.existing.is_some() {
                "added what is new"
            } else {
                "written"
            }
        ));
    }
    let handoff = handoff.canonicalize().unwrap_or_else(|_| handoff.to_owned());
    if !args.no_hooks {
        if cfg.vms.iter().any(|v| v.vmid.is_none()) {
            let hooks_dir = args
                .hooks_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(crate::hook_install::DEFAULT_HOOKS_DIR));
            let opts = crate::hook_install::InstallOptions {
                reload_daemon: hooks_dir == std::path::Path::new(crate::hook_install::DEFAULT_HOOKS_DIR),
                hooks_dir,
                handoff_exe: handoff.clone(),
                ..Default::default()
            };
            let report = crate::hook_install::install_hooks(&opts)?;
            say(report.to_string().trim_end());
        }
        let vmids: Vec<u32> = cfg
            .vms
            .iter()
            .filter_map(|v| v.vmid)
            .chain(
                plan.machine
                    .pve_node_vms
                    .iter()
                    .filter(|v| !v.passthrough.is_empty())
                    .filter_map(|v| v.vmid),
            )
            .collect();
        if on_node && !vmids.is_empty() {
            let roots = crate::pve_hook_install::Roots {
                root: pve.root.clone(),
            };
            let p = crate::pve_hook_install::plan(&roots, &vmids, None, &handoff, false)?;
            crate::pve_hook_install::apply(&roots, &p)?;
            for a in &p.actions {
                say(&format!("  {a}"));
            }
            for f in &p.foreign {
                eprintln!("handoff: warning: {}", f.advice);
            }
            if p.actions.is_empty() {
                say(&format!("the hookscript {} is in place", p.volid));
            }
        }
    }
    if args.no_services {
        say("install-services: skipped (--no-services)");
    } else {
        install_services_for_invoker(&cfg, &path, &handoff, &say)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The steps `setup` would take after writing, in words (`--dry-run` prints them).
fn setup_steps(
    plan: &crate::setup::Plan,
    args: &SetupArgs,
    path: &std::path::Path,
    on_node: bool,
) -> anyhow::Result<Vec<String>> {
    let mut steps = Vec::new();
    if plan.blocked() {
        return Ok(steps);
    }
    let cfg = plan.config()?;
    steps.push(if plan.unchanged() {
        format!("{}: nothing to change", path.display())
    } else if plan.existing.is_some() {
        format!("add {} line(s) to {}", plan.diff.len(), path.display())
    } else {
        format!("write {} (root-owned, mode 0644)", path.display())
    });
    if args.no_hooks {
        steps.push("no hooks (--no-hooks)".into());
    } else {
        if cfg.vms.iter().any(|v| v.vmid.is_none()) {
            steps.push("install the libvirt hook (`handoff install-hooks`)".into());
        }
        let pve = cfg.vms.iter().any(|v| v.vmid.is_some()) || !plan.machine.pve_node_vms.is_empty();
        if pve && on_node {
            steps.push("install the Proxmox VE hookscript (`handoff install-hooks --pve`)".into());
        } else if pve {
            steps.push(
                "not on the Proxmox VE node (no /etc/pve): run `sudo handoff install-hooks --pve` there"
                    .into(),
            );
        }
    }
    steps.push(if args.no_services {
        "no session pieces (--no-services)".into()
    } else {
        format!(
            "`handoff install-services` for {}",
            invoker().map_or("you".into(), |(n, _)| n)
        )
    });
    Ok(steps)
}

/// The person who ran `sudo handoff setup` (`SUDO_USER`, not root), with their uid.
fn invoker() -> Option<(String, PathBuf)> {
    let name = std::env::var("SUDO_USER")
        .ok()
        .filter(|n| !n.is_empty() && n != "root")?;
    let user = nix::unistd::User::from_name(&name).ok().flatten()?;
    Some((name, user.dir))
}

/// `install-services` for whoever ran setup: as that user (through `runuser`) when setup
/// runs under sudo, so their files are theirs; else for this process's own user. Either
/// way for the config setup just wrote (`path`, readable by all), not whichever file that
/// user's own search would find first.
fn install_services_for_invoker(
    cfg: &Config,
    path: &std::path::Path,
    handoff: &std::path::Path,
    say: &dyn Fn(&str),
) -> anyhow::Result<()> {
    if let Some((name, home)) = invoker()
        && nix::unistd::geteuid().is_root()
    {
        let status = std::process::Command::new("runuser")
            .args(["-u", &name, "--"])
            .arg(handoff)
            .arg("--config")
            .arg(path)
            .arg("install-services")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME")
            .env("HOME", home)
            .status()
            .context("running `runuser … handoff install-services`")?;
        if !status.success() {
            eprintln!(
                "handoff: warning: install-services for {name} failed ({status}); run `handoff install-services` as {name}"
            );
        }
        return Ok(());
    }
    let mut layout = crate::services::Layout::from_env()?;
    if let Some(dir) = handoff.parent() {
        layout.bin_dir = dir.to_owned();
    }
    let report = crate::services::install(cfg, &layout, false, false)?;
    say(report.to_string().trim_end());
    Ok(())
}
