//! The operator commands: `status` and `dlq`.
//!
//! Both read either NATS directly (`--nats-url`, distributed mode) or a running
//! radflow's HTTP port (`--url`, which is how the embedded mode is inspected); the report
//! itself is built by `radflow_shared::status` in both cases. With neither, they ask the
//! embedded instance on this machine ([`LOCAL_URL`]), which is what `radflow run` serves
//! by default, so `radflow status` right after `radflow run` needs no flag.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use radflow_shared::bus::Bus;
use radflow_shared::secret::Secret;
use radflow_shared::status::{self, Failure, StatusReport};
use radflow_shared::util::now_ms;

use crate::cli::{DlqArgs, DlqCommand, SourceArgs, StatusArgs};

/// The HTTP address of `radflow run` with its default `--http-port`.
pub const LOCAL_URL: &str = "http://127.0.0.1:8080";

enum Source {
    Nats(std::sync::Arc<radflow_shared::bus::NatsBus>),
    Http { url: String, defaulted: bool },
}

async fn open(args: &SourceArgs) -> Result<Source> {
    if let Some(url) = &args.url {
        let url = url.trim_end_matches('/').to_owned();
        return Ok(Source::Http {
            url,
            defaulted: false,
        });
    }
    if args.bus.nats_url.is_none() {
        let url = LOCAL_URL.to_owned();
        return Ok(Source::Http {
            url,
            defaulted: true,
        });
    }
    let bus = args
        .bus
        .connect_nats_within("radflow-ops", Duration::from_secs(10))
        .await?;
    Ok(Source::Nats(bus))
}

impl Source {
    /// GET or POST `path` on a running radflow's HTTP port.
    async fn http_json<T: serde::de::DeserializeOwned>(
        base: &str,
        defaulted: bool,
        method: reqwest::Method,
        path: &str,
        token: Option<&Secret>,
    ) -> Result<T> {
        http_json(method, format!("{base}{path}"), token)
            .await
            .map_err(|e| {
                if defaulted {
                    e.context(format!(
                        "no radflow answers at {LOCAL_URL}: start one with `radflow run`, or say \
                     where to look: --url http://host:port (RADFLOW_URL) for a running radflow, \
                     --nats-url nats://host:4222 for the distributed mode"
                    ))
                } else {
                    e
                }
            })
    }
}

async fn http_json<T: serde::de::DeserializeOwned>(
    method: reqwest::Method,
    url: String,
    token: Option<&Secret>,
) -> Result<T> {
    let mut request = reqwest::Client::new()
        .request(method, &url)
        .timeout(Duration::from_secs(30));
    if let Some(token) = token {
        request = request.bearer_auth(token.expose());
    }
    let resp = request
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let code = resp.status();
    let body = resp.text().await?;
    if !code.is_success() {
        bail!("{url}: {code}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("{url}: unexpected answer"))
}

async fn report(source: &Source, args: &StatusArgs) -> Result<StatusReport> {
    let mut report = match source {
        Source::Nats(bus) => status::collect(&**bus as &dyn Bus, args.recent).await?,
        Source::Http { url, defaulted } => {
            Source::http_json(url, *defaulted, reqwest::Method::GET, "/status", None).await?
        }
    };
    if let Some(monitor) = &args.nats_monitor_url {
        match status::server_info(monitor).await {
            Ok(info) => report.server = Some(info),
            Err(e) => eprintln!("warning: NATS monitoring endpoint: {e}"),
        }
    }
    Ok(report)
}

/// `radflow status`
pub async fn status(args: StatusArgs) -> Result<()> {
    let source = open(&args.source).await?;
    loop {
        let r = report(&source, &args).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            if args.watch.is_some() {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", status::render(&r));
        }
        let Some(every) = args.watch else {
            return Ok(());
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs_f64(every.max(0.2))) => {}
        }
    }
}

/// `radflow dlq list|replay`
pub async fn dlq(args: DlqArgs) -> Result<()> {
    match args.command {
        DlqCommand::List { source, json } => {
            let list: Vec<Failure> = match open(&source).await? {
                Source::Nats(bus) => status::dead_letters(&*bus, 10_000).await?,
                Source::Http { url, defaulted } => {
                    Source::http_json(&url, defaulted, reqwest::Method::GET, "/dlq", None).await?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no dead letters");
            } else {
                let now = now_ms();
                for f in &list {
                    println!("{}", status::render_failure(f, now));
                }
            }
        }
        DlqCommand::Replay {
            source,
            seq,
            all,
            admin_token,
        } => {
            debug_assert!(all || seq.is_some());
            let n = match open(&source).await? {
                Source::Nats(bus) => status::replay(&*bus, seq).await?,
                Source::Http { url, defaulted } => {
                    let q = seq.map(|s| format!("?seq={s}")).unwrap_or_default();
                    let path = format!("/dlq/replay{q}");
                    let v: serde_json::Value = Source::http_json(
                        &url,
                        defaulted,
                        reqwest::Method::POST,
                        &path,
                        admin_token.as_ref(),
                    )
                    .await?;
                    v["replayed"].as_u64().unwrap_or(0) as usize
                }
            };
            println!("replayed {n} dead letter(s)");
            if n == 0 && seq.is_some() {
                bail!("no dead letter with that sequence number");
            }
        }
    }
    Ok(())
}
