//! The exchange on one machine, no AWS account needed:
//! `cargo run --release --example local-exchange [FOLDER]`.
//!
//! Starts an embedded S3-compatible server (s3s-fs) on 127.0.0.1, plays the bucket
//! owner (every submission comes back as a delivery: `Submissions/report.csv` gives
//! `Delivery/report.csv.processed`), and runs the real daemon on folders under FOLDER
//! (default `./s3-exchange-demo`). Drop a file into the outbox it prints and watch the
//! answer arrive in the inbox. Ctrl-C stops it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use s3_exchange::config::Config;
use s3_exchange::daemon::{self, Daemon};

const BUCKET: &str = "exchange";
const KEY: &str = "local";
const SECRET: &str = "local-secret";

fn main() -> anyhow::Result<()> {
    let base = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("s3-exchange-demo"), PathBuf::from);
    std::fs::create_dir_all(&base)?;
    let base = base.canonicalize()?;
    // The daemon finds its credentials the way it would on a real machine: through the
    // environment. Set before any thread starts.
    // SAFETY: single-threaded here; the runtime is built afterwards.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(demo(&base))
}

async fn demo(base: &Path) -> anyhow::Result<()> {
    let data = base.join("s3-data");
    std::fs::create_dir_all(&data)?;
    let endpoint = serve_s3(&data).await?;
    let owner = owner_client(&endpoint);
    if owner.head_bucket().bucket(BUCKET).send().await.is_err() {
        owner.create_bucket().bucket(BUCKET).send().await?;
    }

    let config_path = base.join("config.toml");
    std::fs::write(&config_path, config_text(base, &endpoint))?;
    let config = Config::load(&config_path)?;
    let _log = s3_exchange::logging::init(&config.log);

    println!(
        "\nlocal exchange running: S3 at {endpoint}, bucket {BUCKET}\n  drop files into  {}\n  answers arrive in {}\n  sent files go to {}\n  config: {}\nCtrl-C to stop.\n",
        config.outbox.dir.display(),
        config.inbox.dir.display(),
        config.outbox.sent_dir.display(),
        config_path.display()
    );

    let shutdown = CancellationToken::new();
    let control = daemon::handle_signals(shutdown.clone())?;
    tokio::spawn(play_owner(owner, shutdown.clone()));
    Daemon::start(&config).await?.run(shutdown, control).await?;
    Ok(())
}

/// Serves s3s-fs over HTTP on an ephemeral loopback port; returns its URL.
async fn serve_s3(root: &Path) -> anyhow::Result<String> {
    let mut builder = S3ServiceBuilder::new(
        s3s_fs::FileSystem::new(root).map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?,
    );
    builder.set_auth(SimpleAuth::from_single(KEY, SECRET));
    let service = builder.build();
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        while let Ok((socket, _)) = listener.accept().await {
            let conn = http
                .serve_connection(TokioIo::new(socket), service.clone())
                .into_owned();
            tokio::spawn(conn);
        }
    });
    Ok(endpoint)
}

fn owner_client(endpoint: &str) -> Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version_latest()
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(KEY, SECRET, None, None, "local-exchange"))
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .build();
    Client::from_conf(config)
}

fn config_text(base: &Path, endpoint: &str) -> String {
    let dir = |name: &str| base.join(name).display().to_string();
    format!(
        r#"# Written by the local-exchange example.
[s3]
bucket = "{BUCKET}"
region = "us-east-1"
endpoint_url = "{endpoint}"
force_path_style = true
checksums = "when_required"

[outbox]
dir = "{outbox}"
sent_dir = "{sent}"
settle = "1s"

[inbox]
dir = "{inbox}"
poll_interval = "2s"

[state]
dir = "{state}"

[log]
dir = "{log}"
"#,
        outbox = dir("outbox"),
        sent = dir("sent"),
        inbox = dir("inbox"),
        state = dir("state"),
        log = dir("log"),
    )
}

/// The owner's side: answers every new submission with a delivery.
async fn play_owner(owner: Client, shutdown: CancellationToken) {
    let mut answered: HashMap<String, (i64, i64)> = HashMap::new();
    while !shutdown.is_cancelled() {
        if let Err(err) = answer_submissions(&owner, &mut answered).await {
            eprintln!("owner: {err}");
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn answer_submissions(
    owner: &Client,
    answered: &mut HashMap<String, (i64, i64)>,
) -> anyhow::Result<()> {
    let mut pages = owner
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("Submissions/")
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for object in page?.contents.unwrap_or_default() {
            let Some(key) = object.key else { continue };
            let version = (
                object.size.unwrap_or(0),
                object
                    .last_modified
                    .and_then(|t| t.to_millis().ok())
                    .unwrap_or(0),
            );
            if answered.get(&key) == Some(&version) {
                continue;
            }
            let body = owner.get_object().bucket(BUCKET).key(&key).send().await?;
            let bytes = body.body.collect().await?.into_bytes();
            let name = key.trim_start_matches("Submissions/");
            let mut answer = format!(
                "processed by the owner: {name}, {} bytes\n---\n",
                bytes.len()
            )
            .into_bytes();
            answer.extend_from_slice(&bytes);
            owner
                .put_object()
                .bucket(BUCKET)
                .key(format!("Delivery/{name}.processed"))
                .body(ByteStream::from(answer))
                .send()
                .await?;
            println!("owner: answered {key} with Delivery/{name}.processed");
            answered.insert(key, version);
        }
    }
    Ok(())
}
