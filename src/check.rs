//! `s3-exchange check [--write]`: diagnose a set-up before (or while) the daemon runs.
//!
//! Each step says what it found or, on failure, the likely cause and fix. The steps
//! follow the order in which a set-up breaks: configuration, credentials, whose they
//! are (STS GetCallerIdentity), listing the inbox prefix, and with `--write` one small
//! probe PUT under the outbox prefix with the configured ACL: the streamed PUT the daemon
//! makes for every file over 64 KiB, through the same [`Store`], so a pass means the
//! daemon's uploads work too (small files, sent from memory, are never stricter).
//!
//! Besides `store`, the only module talking to AWS directly: it asks STS who we are,
//! which the daemon itself never needs.

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_sts::config::{ProvideCredentials, Region, SharedCredentialsProvider};
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};

use crate::config::{Acl, Config};
use crate::keys::ObjectKey;
use crate::logging::error_chain;
use crate::store::{self, Store};

/// No step may hang: credentials from SSO or a role, and each call, get this long.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How one step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass(String),
    /// Not applicable here (for example no STS on an S3-compatible server).
    Skip(String),
    Fail {
        what: String,
        /// Likely cause and fix (`cause: fix` when known).
        hint: Option<String>,
    },
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: &'static str,
    pub outcome: Outcome,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Pass(what) => write!(f, "ok    {:12} {what}", self.name),
            Outcome::Skip(what) => write!(f, "skip  {:12} {what}", self.name),
            Outcome::Fail { what, hint } => {
                write!(f, "FAIL  {:12} {what}", self.name)?;
                match hint
                    .as_deref()
                    .map(|h| h.split_once(": ").unwrap_or(("", h)))
                {
                    Some(("", fix)) => write!(f, "\n      fix:   {fix}"),
                    Some((cause, fix)) => write!(f, "\n      cause: {cause}\n      fix:   {fix}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The whole report; passes when no step failed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub steps: Vec<Step>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self
            .steps
            .iter()
            .any(|s| matches!(s.outcome, Outcome::Fail { .. }))
    }

    fn add(&mut self, name: &'static str, outcome: Outcome) -> bool {
        let ok = !matches!(outcome, Outcome::Fail { .. });
        self.steps.push(Step { name, outcome });
        ok
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for step in &self.steps {
            writeln!(f, "{step}")?;
        }
        if self.passed() {
            write!(f, "all checks passed")
        } else {
            write!(f, "some checks failed")
        }
    }
}

fn fail(what: impl Into<String>, hint: Option<&str>) -> Outcome {
    Outcome::Fail {
        what: what.into(),
        hint: hint.map(str::to_owned),
    }
}

/// Runs every step for `config`; `write` adds the probe upload.
pub async fn run(config: &Config, write: bool) -> Report {
    let mut report = Report::default();
    report.add(
        "config",
        Outcome::Pass(format!(
            "{} (bucket {}, outbox {} -> {}, {} -> inbox {})",
            config.source.display(),
            config.s3.bucket,
            config.outbox.dir.display(),
            config.outbox.prefix,
            config.inbox.prefix,
            config.inbox.dir.display()
        )),
    );
    let credentials = credentials(config).await;
    let provider = match &credentials {
        Ok((provider, description)) => {
            report.add("credentials", Outcome::Pass(description.clone()));
            Some(provider.clone())
        }
        Err(outcome) => {
            report.add("credentials", outcome.clone());
            None
        }
    };
    if let Some(provider) = provider {
        report.add("identity", identity(config, provider).await);
    }
    let store = match Store::connect(&config.s3, &config.transfer).await {
        Ok(store) => store,
        Err(err) => {
            report.add("list", fail(err.to_string(), None));
            return report;
        }
    };
    report.add("list", list(config, &store).await);
    if write {
        report.add("write", probe(config, &store).await);
    }
    report
}

/// The SDK configuration the daemon's store starts from (region and profile), with a
/// bounded call time.
async fn sdk_config(config: &Config) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(config.transfer.connect_timeout)
            .operation_timeout(STEP_TIMEOUT)
            .build(),
    );
    if let Some(region) = &config.s3.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(profile) = &config.s3.profile {
        loader = loader.profile_name(profile);
    }
    loader.load().await
}

/// Resolves the credentials the daemon would use (the default chain, the profile, and
/// the role on top), without revealing the secret.
pub async fn credentials(config: &Config) -> Result<(SharedCredentialsProvider, String), Outcome> {
    let sdk = sdk_config(config).await;
    if sdk.region().is_none() {
        return Err(fail(
            "no AWS region",
            Some(
                "nothing names the bucket's region: set s3.region in the configuration (or AWS_REGION)",
            ),
        ));
    }
    let provider = match &config.s3.role_arn {
        Some(arn) => {
            let mut role = aws_config::sts::AssumeRoleProvider::builder(arn)
                .session_name("s3-exchange-check")
                .configure(&sdk);
            if let Some(id) = &config.s3.external_id {
                role = role.external_id(id);
            }
            SharedCredentialsProvider::new(role.build().await)
        }
        None => match sdk.credentials_provider() {
            Some(p) => p,
            None => return Err(fail("no credentials provider", Some(NO_CREDENTIALS))),
        },
    };
    let resolved = tokio::time::timeout(STEP_TIMEOUT, provider.provide_credentials()).await;
    match resolved {
        Err(_) => Err(fail(
            format!(
                "resolving credentials took more than {}s",
                STEP_TIMEOUT.as_secs()
            ),
            Some(
                "a credential source does not answer (SSO portal, instance metadata, credential_process): check the network, or set AWS_EC2_METADATA_DISABLED=true off EC2",
            ),
        )),
        Ok(Err(err)) => {
            let text = error_chain(&err);
            Err(fail(text.clone(), Some(credential_hint(config, &text))))
        }
        Ok(Ok(creds)) => {
            let mut description = format!("access key {}", mask(creds.access_key_id()));
            if let Some(profile) = &config.s3.profile {
                description.push_str(&format!(", profile {profile}"));
            }
            if let Some(arn) = &config.s3.role_arn {
                description.push_str(&format!(", assumed role {arn}"));
            }
            if let Some(expiry) = creds.expiry() {
                let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
                description.push_str(&format!(
                    ", expires in {}",
                    humantime::format_duration(Duration::from_secs(left.as_secs()))
                ));
            }
            Ok((provider, description))
        }
    }
}

const NO_CREDENTIALS: &str = "no usable AWS credentials: set AWS_PROFILE or s3.profile, export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or log in (aws sso login); under systemd, the service sees only its own environment and files";

/// The likely cause of a credential failure, from the provider's message.
fn credential_hint(config: &Config, text: &str) -> &'static str {
    let lower = text.to_ascii_lowercase();
    if lower.contains("no credentials found") {
        NO_CREDENTIALS
    } else if (config.s3.role_arn.is_some() && lower.contains("assumerole"))
        || lower.contains("sts:assumerole")
    {
        "the role cannot be assumed: check s3.role_arn, s3.external_id and the role's trust policy, which must allow these source credentials"
    } else if lower.contains("sso")
        || lower.contains("token has expired")
        || lower.contains("expired")
    {
        "the SSO session or token expired: run aws sso login (with the profile in s3.profile), then try again"
    } else if lower.contains("profile") {
        "the profile is missing or incomplete: check s3.profile against ~/.aws/config and ~/.aws/credentials"
    } else {
        NO_CREDENTIALS
    }
}

/// `AKIA…WXYZ`: enough to tell keys apart, not enough to use one.
/// Counted in characters: a key ID pasted with a stray non-ASCII character must not panic.
fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "…".into();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

/// Whose credentials these are, through STS GetCallerIdentity.
async fn identity(config: &Config, provider: SharedCredentialsProvider) -> Outcome {
    let sdk = sdk_config(config).await;
    let mut builder = aws_sdk_sts::config::Builder::from(&sdk).credentials_provider(provider);
    if let Some(url) = &config.s3.endpoint_url {
        builder = builder.endpoint_url(url);
    }
    let client = aws_sdk_sts::Client::from_conf(builder.build());
    match client.get_caller_identity().send().await {
        Ok(out) => {
            let account = out.account().unwrap_or("?");
            let mut text = format!("account {account}, {}", out.arn().unwrap_or("?"));
            if config.s3.expected_bucket_owner.as_deref() == Some(account) {
                text.push_str(" (the bucket's owner account itself)");
            }
            Outcome::Pass(text)
        }
        // S3-compatible servers seldom implement STS: not knowing who we are there is
        // not a failure; the list step below proves the credentials.
        Err(err) if config.s3.endpoint_url.is_some() => Outcome::Skip(format!(
            "{} has no usable STS GetCallerIdentity ({})",
            config.s3.endpoint_url.as_deref().unwrap_or_default(),
            shorten(&sts_message(&err))
        )),
        Err(err) => {
            let status = err.raw_response().map(|r| r.status().as_u16());
            let message = sts_message(&err);
            let hint = store::hint("GetCallerIdentity", status, err.code(), &message).or(
                match err.code() {
                    Some("InvalidClientTokenId") => Some(
                        "the access key is unknown to AWS: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or s3.profile",
                    ),
                    Some("ExpiredToken") => Some(
                        "the session expired: refresh it (aws sso login, or the role's source credentials)",
                    ),
                    _ => None,
                },
            );
            fail(format!("GetCallerIdentity: {message}"), hint)
        }
    }
}

fn sts_message<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug + 'static,
{
    match (err.code(), err.message()) {
        (Some(code), Some(message)) => format!("{code} {message}"),
        (Some(code), None) => code.to_owned(),
        _ => error_chain(err),
    }
}

/// The SDK's error text without the `(DispatchFailure(DispatchFailure { ... }))` debug
/// dump it appends: a human reads the first part, the dump is in the daemon's log.
fn shorten(message: &str) -> &str {
    let bytes = message.as_bytes();
    for (i, _) in message.match_indices(" (") {
        let rest = &bytes[i + 2..];
        let name = rest
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        if name > 0 && rest[0].is_ascii_uppercase() && rest.get(name) == Some(&b'(') {
            return &message[..i];
        }
    }
    message
}

/// Causes the store's hints do not cover: the endpoint cannot be reached at all.
fn network_hint(message: &str) -> Option<&'static str> {
    let lower = message.to_ascii_lowercase();
    if lower.contains("dns error") || lower.contains("failed to lookup address") {
        Some("the endpoint's name does not resolve: check s3.endpoint_url (or s3.region) and DNS")
    } else if lower.contains("connection refused") || lower.contains("tcp connect error") {
        Some(
            "nothing answers at the endpoint: check s3.endpoint_url, that the server runs, and any proxy or firewall",
        )
    } else if lower.contains("timeout") || lower.contains("timed out") {
        Some(
            "the server does not answer in time: check the network path to it, or raise transfer.connect_timeout",
        )
    } else {
        None
    }
}

/// ListObjectsV2 on the inbox prefix (the daemon's poll, first page only).
async fn list(config: &Config, store: &Store) -> Outcome {
    match store.list_page(&config.inbox.prefix, None).await {
        Ok(page) => Outcome::Pass(format!(
            "s3://{}/{}: {}{} object{} on the first page",
            config.s3.bucket,
            config.inbox.prefix,
            page.objects.len(),
            if page.next.is_some() { "+" } else { "" },
            if page.objects.len() == 1 { "" } else { "s" }
        )),
        Err(err) => fail(
            format!("{} {}: {}", err.op, err.key, shorten(&err.message)),
            err.hint.or_else(|| network_hint(&err.message)),
        ),
    }
}

/// A small PUT under the outbox prefix with the configured ACL. Its name starts with a
/// dot so that an owner's pipeline that skips hidden names ignores it.
async fn probe(config: &Config, store: &Store) -> Outcome {
    let stamp = crate::plan::time_tag(std::time::SystemTime::now());
    let name = format!(".s3-exchange-check-{stamp}");
    let key = match ObjectKey::for_upload(&config.outbox.prefix, std::path::Path::new(&name)) {
        Ok(key) => key,
        Err(err) => return fail(format!("no probe key: {err}"), None),
    };
    let body = format!(
        "Written by `s3-exchange check --write` at {stamp} to test uploads; safe to delete.\n"
    );
    if let Err(err) = std::fs::create_dir_all(&config.state_dir) {
        return fail(
            format!("cannot create {}: {err}", config.state_dir.display()),
            None,
        );
    }
    let path = config.state_dir.join(format!("{name}.probe"));
    if let Err(err) = std::fs::write(&path, &body) {
        return fail(format!("cannot write {}: {err}", path.display()), None);
    }
    let md5 = crate::md5::Md5::digest(body.as_bytes());
    let result = store.put_object(&key, &path, body.len() as u64, &md5).await;
    let _ = std::fs::remove_file(&path);
    let acl = match &config.s3.acl {
        Acl::None => "no ACL header".to_owned(),
        Acl::Canned(name) => format!("x-amz-acl: {name}"),
    };
    match result {
        Ok(_) => Outcome::Pass(format!(
            "put s3://{}/{key} ({} bytes, {acl})",
            config.s3.bucket,
            body.len()
        )),
        Err(err) => fail(
            format!("{} {}: {} ({acl})", err.op, err.key, shorten(&err.message)),
            err.hint.or_else(|| network_hint(&err.message)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_shows_cause_and_fix_on_their_own_lines() {
        let step = Step {
            name: "write",
            outcome: fail(
                "PutObject k: AccessDenied",
                Some("the bucket policy refuses this: set s3.acl"),
            ),
        };
        let text = step.to_string();
        assert!(text.starts_with("FAIL  write"), "{text}");
        assert!(
            text.contains("\n      cause: the bucket policy refuses this"),
            "{text}"
        );
        assert!(text.contains("\n      fix:   set s3.acl"), "{text}");
    }

    #[test]
    fn the_report_passes_only_without_failures() {
        let mut report = Report::default();
        report.add("config", Outcome::Pass("x".into()));
        report.add("identity", Outcome::Skip("no STS".into()));
        assert!(report.passed());
        report.add("list", fail("denied", None));
        assert!(!report.passed());
        assert!(report.to_string().ends_with("some checks failed"));
    }

    #[test]
    fn credential_failures_name_their_likely_cause() {
        let config = Config::parse(
            std::path::Path::new("/x.toml"),
            "[s3]\nbucket = \"b\"\nregion = \"r\"\n",
        )
        .expect("valid");
        let hint = |text| credential_hint(&config, text);
        assert_eq!(
            hint(
                "the credential provider was not enabled: no credentials found in chain. Attempted: Profile: ..."
            ),
            NO_CREDENTIALS
        );
        assert!(
            hint("Error loading SSO Token: The SSO session has expired").contains("aws sso login")
        );
        assert!(hint("ProfileFile: profile `x` was not defined").contains("s3.profile"));
        assert!(
            hint("User: arn:x is not authorized to perform: sts:AssumeRole on resource")
                .contains("trust policy")
        );
    }

    #[test]
    fn the_sdk_debug_dump_is_cut_and_unreachable_endpoints_explained() {
        let raw = "dispatch failure: io error: client error (Connect): tcp connect error: Connection refused (os error 111) (DispatchFailure(DispatchFailure { source: x }))";
        assert_eq!(
            shorten(raw),
            "dispatch failure: io error: client error (Connect): tcp connect error: Connection refused (os error 111)"
        );
        assert_eq!(
            shorten("AccessDenied Access Denied"),
            "AccessDenied Access Denied"
        );
        assert!(network_hint(raw).is_some_and(|h| h.contains("s3.endpoint_url")));
        assert!(network_hint("AccessDenied").is_none());
    }

    #[test]
    fn keys_are_masked() {
        assert_eq!(mask("AKIAIOSFODNN7EXAMPLE"), "AKIA…MPLE");
        assert_eq!(mask("test"), "…");
        assert_eq!(mask("AKIAÉIOSFODNN7EXAMPLé"), "AKIA…MPLé");
        assert_eq!(mask("AKIÉIOSFODNN7EXAMPLE"), "AKIÉ…MPLE");
    }
}
