//! Configs for simulated machines, as the tests write them: the `[host]` section that points
//! handoff at a simulated machine's roots, and a whole config for the simulated
//! workstation with one VM in libvirt's built-in test driver (no daemon, no hooks).

use std::fs;
use std::path::{Path, PathBuf};

use handoff::Host;
use handoff::simulated_tree::{RTX_3090_TI, SimHost, SimSpec};

/// A config's `[host]` section for `host` (a simulated machine's roots).
///
/// `uninspectable_ok` lists the processes this machine's root cannot inspect (PID 1 of the
/// container the tests run in): the holder scan fails closed on them, and these tests are
/// about the GPU's own holders, which are real child processes root does see.
pub fn host_section(host: &Host) -> String {
    format!(
        "[host]\nsysfs = \"{}\"\nproc = \"/proc\"\ndev = \"{}\"\nrun = \"{}\"\nuninspectable_ok = {:?}\n\n",
        host.sysfs.display(),
        host.dev.display(),
        host.run.display(),
        handoff::holders::uninspectable_now(Path::new("/proc"))
    )
}

/// A simulated workstation on plain files under `dir/machine` (no FUSE: nothing is bound)
/// and `dir/config.toml` for it: the RTX 3090 Ti returning to `nvidia`, its `[host]`
/// section, `extra` (more sections, e.g. `[looking_glass]`), and one VM, `win11`
/// ("Windows"), shut off, in a libvirt test-driver file `dir/libvirt-test.xml`. Returns the
/// machine and the config's path.
pub fn workstation_with_test_vm(dir: &Path, extra: &str) -> (SimHost, PathBuf) {
    let sim = SimHost::build(&dir.join("machine"), &SimSpec::workstation()).unwrap();
    let uri = crate::libvirt::test_driver_node(&dir.join("libvirt-test.xml"), &[("win11", false, &[])]);
    let config = dir.join("config.toml");
    fs::write(
        &config,
        format!(
            "[gpu]\naddress = \"{RTX_3090_TI}\"\nhost_driver = \"nvidia\"\n\n{}{extra}\
             [[vm]]\nname = \"win11\"\nlabel = \"Windows\"\nuri = {uri:?}\n",
            host_section(&sim.host()),
        ),
    )
    .unwrap();
    (sim, config)
}
