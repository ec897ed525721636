//! Property tests over the readers of outside input: the config parser, the domain XML
//! libvirt hands the hook, the restore record and the hook's state file. For any input:
//! no panic, and a rejection says which input it is about (the file's path, or "the domain
//! XML"), so a person reading it in libvirt's error or a terminal knows where to look.
//!
//! Inputs are built from the pieces a real file is made of (keys, tags, quotes, numbers at
//! the edges of their types) mixed with arbitrary text, so the cases reach past the first
//! syntax error. A few hundred cases per property keep this to seconds; failures are not
//! persisted (no regression files written into the repository, under CI or not).

use std::path::Path;

use handoff::bind::record::RestoreRecord;
use handoff::config::Config;
use handoff::hook;
use handoff::pci::PciAddress;
use handoff::state::HookState;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text made of `pieces` and arbitrary strings, in any order.
fn text_of(pieces: &'static [&'static str], max: usize) -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => proptest::sample::select(pieces).prop_map(str::to_owned),
        1 => any::<String>(),
        1 => any::<char>().prop_map(String::from),
    ];
    proptest::collection::vec(piece, 0..max).prop_map(|v| v.concat())
}

const TOML_PIECES: &[&str] = &[
    "[gpu]\n",
    "[[vm]]\n",
    "[host]\n",
    "[looking_glass]\n",
    "[block]\n",
    "address = ",
    "host_driver = ",
    "watchdog_s = ",
    "name = ",
    "label = ",
    "uri = ",
    "shutdown_timeout_s = ",
    "sysfs = ",
    "proc = ",
    "dev = ",
    "run = ",
    "middle_click = ",
    "\"0000:01:00.0\"",
    "\"01:00.0\"",
    "\"0000:01:00.0/../../x\"",
    "\"nvidia\"",
    "\"../evil\"",
    "\"/sys\"",
    "\"relative\"",
    "\"win11\"",
    "\"\"",
    "0",
    "1",
    "-1",
    "18446744073709551615",
    "18446744073709551616",
    "1e309",
    "[\"a\", 1]",
    "{ x = 1 }",
    "true",
    "\n",
    " ",
    "#",
    "=",
    "\"",
    "'",
    "\\",
    "[",
    "]",
];

const XML_PIECES: &[&str] = &[
    "<domain type='kvm'>",
    "</domain>",
    "<devices>",
    "</devices>",
    "<metadata>",
    "</metadata>",
    "<hostdev mode='subsystem' type='pci' managed='no'>",
    "<hostdev type='usb'>",
    "</hostdev>",
    "<source>",
    "</source>",
    "<address ",
    "/>",
    "domain='0x0000' ",
    "bus='0x01' ",
    "bus='0x101' ",
    "bus='1' ",
    "bus='010' ",
    "bus='-1' ",
    "bus='0x' ",
    "bus='4294967296' ",
    "slot='0x00' ",
    "slot='0x20' ",
    "function='0x0' ",
    "function='0x8' ",
    "<name>win11</name>",
    "<!-- c -->",
    "<![CDATA[x]]>",
    "&amp;",
    "&bogus;",
    "<?xml version='1.0'?>",
    "<!DOCTYPE domain>",
    "<",
    ">",
    "'",
    "\"",
    "\n",
];

const JSON_PIECES: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"version\"",
    "\"gpu\"",
    "\"vm\"",
    "\"phase\"",
    "\"functions\"",
    "\"address\"",
    "\"driver\"",
    "\"hung_writer\"",
    "\"hung_writer_start\"",
    "\"updated\"",
    "\"last_refusal\"",
    "\"0000:01:00.0\"",
    "\"0000:01:00.0/..\"",
    "\"stuck\"",
    "\"bound\"",
    "\"restore-required\"",
    "\"nvidia\"",
    "null",
    "1",
    "-1",
    "2147483648",
    "18446744073709551616",
    "1.5",
    "true",
    "\"\\u0000\"",
    "\"\\ud800\"",
];

/// A valid record, then bytes flipped in it: close to real, broken in one place.
fn mutated(valid: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6).prop_map(move |edits| {
        let mut bytes = valid.to_vec();
        for (i, b) in edits {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        bytes
    })
}

const VALID_RECORD: &[u8] = br#"{"version":1,"gpu":"0000:01:00.0","vm":"win11","created":1,"phase":"stuck","functions":[{"address":"0000:01:00.0","driver":"nvidia","driver_override":null}],"problem":"x","hung_writer":4242,"hung_writer_start":99}"#;
const VALID_STATE: &[u8] = br#"{"version":1,"updated":1,"gpu":"0000:01:00.0","phase":"vfio","vm":"win11","last_refusal":null,"last_error":null}"#;

fn host_in(dir: &Path) -> handoff::Host {
    handoff::Host {
        sysfs: dir.join("sys"),
        procfs: dir.join("proc"),
        dev: dir.join("dev"),
        run: dir.join("run"),
        ..handoff::Host::system()
    }
}

const GPU: PciAddress = PciAddress::new(0, 1, 0, 0);

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_config_parser_never_panics_and_names_the_file(text in text_of(TOML_PIECES, 40)) {
        let path = Path::new("/etc/handoff/prop-config.toml");
        if let Err(e) = Config::parse(&text, path) {
            let msg = e.to_string();
            prop_assert!(msg.contains("/etc/handoff/prop-config.toml"), "{msg}");
        }
    }

    #[test]
    fn a_config_file_of_any_bytes_is_read_or_refused_naming_it(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.toml");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = Config::load_file(&path) {
            let msg = e.to_string();
            prop_assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
    }

    #[test]
    fn the_domain_xml_reader_never_panics_and_names_the_xml(text in text_of(XML_PIECES, 40)) {
        match hook::domain_hostdevs(&text) {
            Ok(found) => {
                // Whatever it found is a real PCI address: nothing truncated into range.
                for a in found {
                    prop_assert!(a.device <= 0x1f && a.function <= 7, "{a}");
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("the domain XML"), "{msg}");
            }
        }
        // And the hook's own question about it.
        let cfg = Config::default();
        if let Err(e) = hook::uses_gpu(&cfg, "prop", &text) {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("the domain XML"), "{msg}");
        }
    }

    #[test]
    fn domain_xml_of_any_bytes_on_stdin_is_read_or_refused_naming_it(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = hook::read_domain_xml(&mut bytes.as_slice()) {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("the domain XML"), "{msg}");
        }
    }

    #[test]
    fn the_restore_record_reader_never_panics_and_names_the_record(
        bytes in prop_oneof![
            mutated(VALID_RECORD),
            text_of(JSON_PIECES, 30).prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..256),
        ]
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let host = host_in(tmp.path());
        let path = RestoreRecord::path(&host, GPU);
        std::fs::create_dir_all(&host.run).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        match RestoreRecord::load(&host, GPU) {
            Ok(Some(r)) => {
                // A record that parses may still name nonsense; asking it must not panic.
                let _ = r.hung_writer_alive();
                let _ = r.function(GPU);
            }
            Ok(None) => prop_assert!(false, "a file that is there read as no record"),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains(&path.display().to_string()), "{msg}");
            }
        }
    }

    #[test]
    fn the_state_file_reader_never_panics_and_names_the_file(
        bytes in prop_oneof![
            mutated(VALID_STATE),
            text_of(JSON_PIECES, 30).prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..256),
        ]
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let host = host_in(tmp.path());
        std::fs::create_dir_all(&host.run).unwrap();
        std::fs::write(host.state_file(), &bytes).unwrap();
        match HookState::read(&host) {
            Ok(Some(_)) => prop_assert!(HookState::load(&host).is_some()),
            Ok(None) => prop_assert!(false, "a file that is there read as no state"),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains(&host.state_file().display().to_string()), "{msg}");
                prop_assert!(HookState::load(&host).is_none());
            }
        }
    }
}

#[test]
fn the_valid_seeds_of_the_mutations_are_valid() {
    // The mutation strategies start from these: they must parse, or the properties would
    // only ever see broken files.
    serde_json::from_slice::<RestoreRecord>(VALID_RECORD).unwrap();
    serde_json::from_slice::<HookState>(VALID_STATE).unwrap();
}
