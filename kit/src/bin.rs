//! Where the workspace's binaries and the tools the lab needs are found.
//!
//! [`bin_path`] looks in `$TETHER_BIN_DIR` if it is set (and only there), else next to the
//! running executable and in its parent directory, then on `PATH`; [`find_on_path`] only on
//! `PATH` (for `redis-server`, `nats-server`, `node`, `haproxy` …).

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Environment variable naming the directory that holds `tether-node` and `tether-balancer`.
pub const BIN_DIR_ENV: &str = "TETHER_BIN_DIR";
/// File name of the node binary.
pub const NODE_BIN: &str = "tether-node";
/// File name of the balancer binary.
pub const BALANCER_BIN: &str = "tether-balancer";

/// Finds a workspace binary such as [`NODE_BIN`].
///
/// Looks in `$TETHER_BIN_DIR` if it is set (and nowhere else, so a wrong setting is not
/// silently papered over); otherwise next to the running executable and in its parent
/// directory (integration-test binaries live in `target/debug/deps`, the workspace binaries in
/// `target/debug`); then on `PATH`.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    bin_path_in(name, std::env::var_os(BIN_DIR_ENV))
}

fn bin_path_in(name: &str, bin_dir: Option<std::ffi::OsString>) -> Result<PathBuf> {
    const HINT: &str = "build them with `cargo build --bins`";
    if let Some(dir) = bin_dir {
        let candidate = Path::new(&dir).join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        bail!("{name} not found: {} does not exist ({BIN_DIR_ENV} is set); {HINT}", candidate.display());
    }
    let mut searched = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        let dir = exe.parent();
        for dir in [dir, dir.and_then(Path::parent)].into_iter().flatten() {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
            searched.push(dir.display().to_string());
        }
    }
    if let Some(found) = find_on_path(name) {
        return Ok(found);
    }
    searched.push("$PATH".to_owned());
    bail!("{name} not found (searched {}); {HINT}", searched.join(", "))
}

/// The first `name` in a directory of `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_dir_env_is_authoritative() {
        let err = bin_path_in(NODE_BIN, Some("/nonexistent-tether-bin-dir".into())).expect_err("missing").to_string();
        assert!(err.contains("/nonexistent-tether-bin-dir/tether-node"), "{err}");
        assert!(err.contains("cargo build --bins"), "{err}");
    }
}
