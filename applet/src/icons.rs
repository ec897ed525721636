//! The tray's icons: one per state, SVGs in `icons/hicolor/scalable/apps/` installed by
//! name (`IconName`), and the same SVGs rendered with resvg to ARGB32 pixmaps
//! (`IconPixmap`, 22/32/48 px) so hosts without the icon theme show them too.
//!
//! The SVGs are compiled in; each is rendered once, on first use.

use std::sync::OnceLock;

use handoff::verdict::State;

/// The sizes rendered for `IconPixmap`: panel sizes at 1x, 1.5x and 2x.
pub const SIZES: [u32; 3] = [22, 32, 48];

/// The six icons. Which one a GPU shows is a render of the library's verdict
/// ([`Icon::of`]); the rules are `handoff::verdict`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icon {
    /// On the host driver, nothing uses it.
    Host,
    /// On vfio-pci, in a VM.
    Vm,
    /// A handoff is under way (the tray's own action, or the hook binding/returning).
    Switching,
    /// On the host and in use: a start would be refused (or just was).
    Busy,
    /// A handoff did not finish: `handoff rebind --force` is needed.
    Restore,
    /// libvirt cannot be asked (or no GPU at the address): VM states unknown; or idle as
    /// far as the holder scan could see, but it could not look everywhere.
    Offline,
}

impl Icon {
    /// The tray's render table: verdict state → icon.
    pub fn of(state: State) -> Icon {
        match state {
            State::Idle => Icon::Host,
            State::Busy => Icon::Busy,
            State::InVm => Icon::Vm,
            State::Switching => Icon::Switching,
            State::RestoreRequired | State::Unreadable => Icon::Restore,
            State::Absent | State::LibvirtUnreachable => Icon::Offline,
        }
    }

    /// [`Icon::of`] the verdict's state, except an idle GPU the holder scan could not fully
    /// inspect (the verdict's `unseen`): grey, "not known", never the host's "free".
    pub fn of_verdict(v: &handoff::verdict::Verdict) -> Icon {
        if v.unseen {
            return Icon::Offline;
        }
        Icon::of(v.state)
    }

    pub const ALL: [Icon; 6] = [
        Icon::Host,
        Icon::Vm,
        Icon::Switching,
        Icon::Busy,
        Icon::Restore,
        Icon::Offline,
    ];

    /// The themed icon name (the SVG's file name without `.svg`).
    pub fn name(self) -> &'static str {
        match self {
            Icon::Host => "handoff-host",
            Icon::Vm => "handoff-vm",
            Icon::Switching => "handoff-switching",
            Icon::Busy => "handoff-busy",
            Icon::Restore => "handoff-restore",
            Icon::Offline => "handoff-offline",
        }
    }

    fn svg(self) -> &'static str {
        match self {
            Icon::Host => include_str!("../../icons/hicolor/scalable/apps/handoff-host.svg"),
            Icon::Vm => include_str!("../../icons/hicolor/scalable/apps/handoff-vm.svg"),
            Icon::Switching => include_str!("../../icons/hicolor/scalable/apps/handoff-switching.svg"),
            Icon::Busy => include_str!("../../icons/hicolor/scalable/apps/handoff-busy.svg"),
            Icon::Restore => include_str!("../../icons/hicolor/scalable/apps/handoff-restore.svg"),
            Icon::Offline => include_str!("../../icons/hicolor/scalable/apps/handoff-offline.svg"),
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }

    /// The pixmaps for `IconPixmap`, rendered once per state.
    pub fn pixmaps(self) -> Vec<ksni::Icon> {
        static CACHE: [OnceLock<Vec<ksni::Icon>>; 6] = [const { OnceLock::new() }; 6];
        CACHE[self.index()]
            .get_or_init(|| SIZES.iter().filter_map(|&s| render(self.svg(), s)).collect())
            .clone()
    }
}

/// Renders `svg` to a `size`×`size` ARGB32 (network byte order) icon, as the
/// StatusNotifierItem spec wants. None if the SVG does not parse (a test checks they all do).
pub fn render(svg: &str, size: u32) -> Option<ksni::Icon> {
    use resvg::{tiny_skia, usvg};
    let tree = usvg::Tree::from_str(svg, &usvg::Options::default()).ok()?;
    let mut pixmap = tiny_skia::Pixmap::new(size, size)?;
    let scale = size as f32 / tree.size().width().max(tree.size().height());
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    let mut data = Vec::with_capacity((size * size * 4) as usize);
    for p in pixmap.pixels() {
        let c = p.demultiply();
        data.extend_from_slice(&[c.alpha(), c.red(), c.green(), c.blue()]);
    }
    Some(ksni::Icon {
        width: size as i32,
        height: size as i32,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_renders_at_every_size_with_visible_pixels() {
        for s in Icon::ALL {
            let icons = s.pixmaps();
            assert_eq!(icons.len(), SIZES.len(), "{s:?}");
            for (icon, size) in icons.iter().zip(SIZES) {
                assert_eq!((icon.width, icon.height), (size as i32, size as i32));
                assert_eq!(icon.data.len(), (size * size * 4) as usize);
                let opaque = icon.data.chunks(4).filter(|p| p[0] == 255).count();
                assert!(
                    opaque > (size * size / 4) as usize,
                    "{s:?} at {size} px is mostly empty"
                );
            }
        }
    }

    #[test]
    fn states_look_different() {
        let colours: Vec<[u8; 4]> = Icon::ALL
            .iter()
            .map(|s| {
                let icon = &s.pixmaps()[2];
                // The card's body, left of the fan.
                let (x, y) = (8, 32);
                let i = ((y * icon.width + x) * 4) as usize;
                [icon.data[i], icon.data[i + 1], icon.data[i + 2], icon.data[i + 3]]
            })
            .collect();
        for (i, a) in colours.iter().enumerate() {
            for b in &colours[i + 1..] {
                assert_ne!(a, b, "two states share the body colour {a:?}");
            }
        }
    }

    #[test]
    fn names_match_the_installed_files() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../icons/hicolor/scalable/apps");
        for s in Icon::ALL {
            let path = format!("{dir}/{}.svg", s.name());
            assert!(std::path::Path::new(&path).exists(), "{path} is missing");
        }
    }
}
