//! PCI addresses, validated strictly.
//!
//! An address from the config becomes part of paths that root writes to
//! (`/sys/bus/pci/devices/<addr>/driver_override`), so nothing but the exact kernel form
//! may pass: `dddd:bb:dd.f` in lower-case hex. Two lenient inputs are normalised rather
//! than refused, because people copy them from `lspci`: upper-case hex, and the short
//! form `bb:dd.f`, which `lspci` prints when the domain is 0000.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A PCI function address in the kernel's sysfs form, e.g. `0000:01:00.0`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

/// Why a string is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a PCI address: {why}; expected domain:bus:device.function in hex, \
     like 0000:01:00.0 (the short form 01:00.0 means domain 0000)"
)]
pub struct PciAddressError {
    pub input: String,
    pub why: &'static str,
}

impl PciAddress {
    pub const fn new(domain: u16, bus: u8, device: u8, function: u8) -> Self {
        Self {
            domain,
            bus,
            device,
            function,
        }
    }

    /// The same slot, another function (01:00.0 → 01:00.1).
    pub const fn with_function(self, function: u8) -> Self {
        Self { function, ..self }
    }

    /// Two addresses are in the same slot when only the function differs.
    pub fn same_slot(&self, other: &PciAddress) -> bool {
        self.domain == other.domain && self.bus == other.bus && self.device == other.device
    }
}

fn hex_field(s: &str, len: usize, input: &str, what: &'static str) -> Result<u32, PciAddressError> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PciAddressError {
            input: input.to_owned(),
            why: what,
        });
    }
    // All ASCII hex digits and at most 4 of them: this cannot fail.
    Ok(u32::from_str_radix(s, 16).expect("checked hex"))
}

impl FromStr for PciAddress {
    type Err = PciAddressError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why| PciAddressError {
            input: input.to_owned(),
            why,
        };
        if input.is_empty() {
            return Err(err("it is empty"));
        }
        if !input
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(err("it contains characters other than hex digits, ':' and '.'"));
        }
        let (head, function) = input
            .rsplit_once('.')
            .ok_or_else(|| err("the '.function' part is missing"))?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, dev] => (
                hex_field(d, 4, input, "the domain must be 4 hex digits")?,
                *b,
                *dev,
            ),
            [b, dev] => (0, *b, *dev),
            _ => return Err(err("it needs domain:bus:device.function")),
        };
        let bus = hex_field(bus, 2, input, "the bus must be 2 hex digits")?;
        let device = hex_field(device, 2, input, "the device must be 2 hex digits")?;
        let function = hex_field(function, 1, input, "the function must be 1 hex digit")?;
        if device > 0x1f {
            return Err(err("the device number must be at most 1f"));
        }
        if function > 7 {
            return Err(err("the function number must be at most 7"));
        }
        Ok(PciAddress::new(
            domain as u16,
            bus as u8,
            device as u8,
            function as u8,
        ))
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl fmt::Debug for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PciAddress({self})")
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_round_trips() {
        let a: PciAddress = "0000:01:00.0".parse().unwrap();
        assert_eq!(a, PciAddress::new(0, 1, 0, 0));
        assert_eq!(a.to_string(), "0000:01:00.0");
    }

    #[test]
    fn upper_case_and_short_form_are_normalised() {
        assert_eq!(
            "0000:0A:1F.7".parse::<PciAddress>().unwrap().to_string(),
            "0000:0a:1f.7"
        );
        assert_eq!(
            "01:00.1".parse::<PciAddress>().unwrap().to_string(),
            "0000:01:00.1"
        );
    }

    #[test]
    fn path_tricks_are_refused() {
        for bad in [
            "../../..",
            "0000:01:00.0/../x",
            "0000:01:00.0 ",
            "/sys",
            "0000:01:00",
            "0000:01:00.8",
            "0000:01:20.0",
            "000:01:00.0",
            "0000:1:00.0",
            "0000:01:00.0.0",
            "1:2:3:4.0",
            "",
        ] {
            let e = bad.parse::<PciAddress>().unwrap_err();
            assert!(
                e.to_string().contains("expected domain:bus:device.function"),
                "{bad}: {e}"
            );
        }
    }
}
