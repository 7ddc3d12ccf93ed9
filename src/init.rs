//! `s3-exchange init`: a starter configuration from the shipped template, and the
//! folders it names, so that a new user goes from nothing to `check` in one command.
//!
//! An existing configuration is never overwritten: it may hold the only record of the
//! user's settings. The folders are created either way (that is idempotent).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::{self, AfterUpload, Config};

/// The shipped example, which a unit test in `config` keeps valid.
pub const TEMPLATE: &str = include_str!("../config/s3-exchange.example.toml");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write the configuration {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("cannot create {what} {path}: {source}")]
    Folder {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0:?} is not usable here: {1}")]
    Value(String, &'static str),
}

impl Error {
    /// Configuration problems are EX_CONFIG, folders EX_CANTCREAT, like the daemon's.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Value(..) => config::EXIT_CONFIG,
            Error::Write { .. } | Error::Folder { .. } => 73,
        }
    }
}

/// What `init` did.
#[derive(Debug)]
pub struct Done {
    /// True when the configuration file was written now, false when it existed.
    pub wrote_config: bool,
    pub config: Config,
    pub created: Vec<PathBuf>,
}

/// A site-wide template an administrator (or the package, as a conffile) provides;
/// `init` prefers it to the built-in one, so a site can preset bucket, region, endpoint.
pub const SITE_TEMPLATE: &str = "/etc/s3-exchange/config.example.toml";

/// The template to start from: the site's, when readable, else the built-in one.
pub fn template() -> String {
    std::fs::read_to_string(SITE_TEMPLATE).unwrap_or_else(|_| TEMPLATE.to_owned())
}

/// `template` with `bucket` and `region` filled in where given: the first line that
/// sets each (commented out or not) is replaced.
pub fn starter(
    template: &str,
    bucket: Option<&str>,
    region: Option<&str>,
) -> Result<String, Error> {
    let mut lines: Vec<String> = template.lines().map(str::to_owned).collect();
    for (key, value) in [("bucket", bucket), ("region", region)] {
        let Some(value) = value else { continue };
        if value.is_empty() || value.contains(['"', '\\', '\n']) {
            return Err(Error::Value(
                value.into(),
                "quotes, backslashes and newlines cannot be part of a bucket or region name",
            ));
        }
        let setting = format!("{key} = \"{value}\"");
        let sets = |line: &String| {
            let bare = line.trim_start().trim_start_matches('#').trim_start();
            bare.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        };
        match lines.iter_mut().find(|l| sets(l)) {
            Some(line) => *line = setting,
            None => {
                return Err(Error::Value(
                    value.into(),
                    "the template has no such setting to fill in",
                ));
            }
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    Ok(text)
}

/// Writes the starter configuration to `path` unless a file is there (mode 0600: it
/// may come to hold a role ARN and external id), then creates the folders it names.
pub fn init(path: &Path, bucket: Option<&str>, region: Option<&str>) -> Result<Done, Error> {
    let text = starter(&template(), bucket, region)?;
    let write_err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(write_err)?;
    }
    let wrote_config = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            file.write_all(text.as_bytes()).map_err(write_err)?;
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(write_err(e)),
    };
    let config = Config::load(path)?;
    let mut folders = vec![
        ("the outbox", config.outbox.dir.clone()),
        ("the inbox", config.inbox.dir.clone()),
        ("the state folder", config.state_dir.clone()),
        ("the log folder", config.log.dir.clone()),
    ];
    if config.outbox.after_upload == AfterUpload::Move {
        folders.push(("the sent folder", config.outbox.sent_dir.clone()));
    }
    let mut created = Vec::new();
    for (what, dir) in folders {
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(|source| Error::Folder {
                what,
                path: dir.clone(),
                source,
            })?;
            created.push(dir);
        }
    }
    Ok(Done {
        wrote_config,
        config,
        created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_starter_fills_in_bucket_and_region() {
        let text = starter(TEMPLATE, Some("their-bucket"), Some("eu-west-1")).expect("valid names");
        let config = Config::parse(Path::new("/x.toml"), &text).expect("parses");
        assert_eq!(config.s3.bucket, "their-bucket");
        assert_eq!(config.s3.region.as_deref(), Some("eu-west-1"));
        assert!(starter(TEMPLATE, Some("a\"b"), None).is_err());
    }

    #[test]
    fn init_creates_folders_and_never_overwrites_a_configuration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let path = root.join("cfg/config.toml");
        let text = starter(TEMPLATE, Some("b1"), None)
            .expect("starter")
            .replace("~/exchange", &root.join("ex").display().to_string())
            .replace("~/.local/state", &root.join("state").display().to_string());
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &text).expect("write");
        let done = init(&path, Some("other"), None).expect("init");
        assert!(!done.wrote_config, "the existing file stays");
        assert_eq!(done.config.s3.bucket, "b1");
        for sub in ["ex/outbox", "ex/inbox", "ex/sent", "state/s3-exchange/log"] {
            assert!(root.join(sub).is_dir(), "{sub} created");
        }
        assert_eq!(done.created.len(), 5);
        let again = init(&path, None, None).expect("init again");
        assert!(again.created.is_empty(), "idempotent");
    }
}
