//! A small tmpfs mounted over a test folder, to fill a disk on purpose. Needs root (or
//! CAP_SYS_ADMIN); where mounting is not allowed the caller skips with the reason.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs; unmounted on drop (lazily if something still holds it open).
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount`'s syntax: `2m`) on the existing folder `path`.
    pub fn mount(path: &Path, size: &str) -> Result<Self, String> {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs on {} failed ({}): {}",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Grows (or shrinks) the mounted file system to `size`, keeping its contents.
    #[track_caller]
    pub fn resize(&self, size: &str) {
        self.remount(&format!("size={size}"));
    }

    /// Remounts with `options` (`ro`, `rw`, `size=16m`), keeping the contents.
    #[track_caller]
    pub fn remount(&self, options: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "mount -o remount,{options} {} failed ({}): {}",
            self.path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let plain = Command::new("umount").arg(&self.path).status();
        if !plain.is_ok_and(|s| s.success()) {
            // Still busy (a process holds it): detach now, the kernel frees it later.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}
