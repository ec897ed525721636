//! Screenshots a test takes of a real bar or window, and what is in them: where they go
//! (`HANDOFF_SCREENSHOTS`, for the docs' pictures, else the test's temp dir) and how many
//! pixels of a colour a picture has (ImageMagick's histogram).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the pictures go: `HANDOFF_SCREENSHOTS` (relative to the workspace root), else
/// `fallback`. Only `scripts/refresh-screenshots.sh` sets it: a normal run never writes into
/// the repository.
pub fn out_dir(fallback: &Path) -> PathBuf {
    match std::env::var_os("HANDOFF_SCREENSHOTS") {
        Some(d) => {
            let d = PathBuf::from(d);
            let d = if d.is_relative() {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(d)
            } else {
                d
            };
            std::fs::create_dir_all(&d).unwrap();
            d.canonicalize().unwrap()
        }
        None => fallback.to_owned(),
    }
}

/// The picture's colour histogram (`convert … histogram:info:-`).
pub fn colours(png: &Path) -> String {
    let out = Command::new("convert")
        .arg(png)
        .args(["-format", "%c", "histogram:info:-"])
        .output()
        .unwrap();
    assert!(out.status.success(), "convert: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many pixels of `hex` (`#RRGGBB`) a [`colours`] histogram counts.
pub fn pixels_of(histogram: &str, hex: &str) -> u64 {
    let hex = hex.to_ascii_uppercase();
    histogram
        .lines()
        .filter(|l| l.to_ascii_uppercase().contains(&format!("{hex} ")))
        .filter_map(|l| l.trim().split(':').next()?.trim().parse::<u64>().ok())
        .sum()
}

/// Crops `png` in place to `WxH+X+Y` and strips its metadata, so the file changes only
/// when the picture does.
pub fn crop(png: &Path, geometry: &str) {
    let ok = Command::new("convert")
        .arg(png)
        .args([
            "-crop",
            geometry,
            "+repage",
            "-strip",
            "-define",
            "png:exclude-chunks=date,time",
        ])
        .arg(png)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "convert -crop {geometry} {}", png.display());
}

/// i3bar's window geometry, `(width, height)`, from `xwininfo -root -tree` on `display`.
pub fn i3bar_size(display: &str) -> Option<(u32, u32)> {
    let out = Command::new("xwininfo")
        .args(["-root", "-tree"])
        .env("DISPLAY", display)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("\"i3bar for output"))?;
    // …"i3bar")  800x26+0+0  +0+0
    let geo = line
        .split_whitespace()
        .find(|w| w.contains('x') && w.contains('+') && w.starts_with(|c: char| c.is_ascii_digit()))?;
    let (w, rest) = geo.split_once('x')?;
    let h = rest.split('+').next()?;
    Some((w.parse().ok()?, h.parse().ok()?))
}

/// `import -window root` on `display` into `png`, cropped to `geometry` (`WxH+X+Y`).
pub fn x11(display: &str, png: &Path, geometry: &str) {
    let ok = Command::new("import")
        .args(["-window", "root"])
        .arg(png)
        .env("DISPLAY", display)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "import -window root {}", png.display());
    crop(png, geometry);
}
