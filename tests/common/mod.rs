//! Support shared by the integration tests. Each test binary includes it with `mod common;`;
//! not every binary uses every helper.
#![allow(dead_code)]

pub mod backup;
pub mod bins;
pub mod desktop;
pub mod libvirt;
pub mod stage;
pub mod system_bus;
pub mod systemd_user;
