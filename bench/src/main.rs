//! `s3bench`: one S3 workload against one endpoint, reported as a JSON line.
//!
//! The same binary and the same AWS SDK client drive every server in a comparison, so
//! the ratios measure the servers, not the clients. Workloads: `put` (new keys),
//! `get` (random reads of pre-written objects), `mixed` (half GET, half PUT over the
//! same key set). Requests are issued by `--concurrency` tasks for `--seconds`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use clap::Parser;
use rand::Rng;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long)]
    endpoint: String,
    #[arg(long, env = "AWS_ACCESS_KEY_ID")]
    access_key: String,
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    secret_key: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    #[arg(long, default_value = "bench")]
    bucket: String,
    /// put | get | mixed
    #[arg(long)]
    op: String,
    /// Object size in bytes.
    #[arg(long)]
    size: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Label printed with the result (e.g. the server's name).
    #[arg(long, default_value = "")]
    label: String,
    /// Operations per second over all tasks, each task starting its operations on a
    /// fixed schedule (an open loop; 0: each task starts the next as soon as the last
    /// ends). Latency is measured from the scheduled start, so a stalled server shows.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Attempts per operation (the SDK's standard retry: 3); 1 counts every failed
    /// attempt as an error instead of retrying it.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// Print to stderr every operation that took longer than this many milliseconds
    /// (its own time, not its lateness in an open loop) and every failed one (0: none).
    #[arg(long, default_value_t = 0)]
    show_slow_ms: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .region(Region::new(a.region.clone()))
        .endpoint_url(&a.endpoint)
        .credentials_provider(Credentials::new(
            &a.access_key,
            &a.secret_key,
            None,
            None,
            "bench",
        ))
        .force_path_style(true)
        .retry_config(
            aws_sdk_s3::config::retry::RetryConfig::standard()
                .with_max_attempts(a.max_attempts.max(1)),
        )
        .build();
    let c = aws_sdk_s3::Client::from_conf(conf);
    let _ = c.create_bucket().bucket(&a.bucket).send().await;
    let mut payload = vec![0u8; a.size];
    rand::rng().fill(&mut payload[..]);
    let payload = Bytes::from(payload);
    // GET and mixed read a fixed key set written beforehand.
    let keyset = if a.size >= 32 << 20 {
        2 * a.concurrency
    } else {
        8 * a.concurrency
    };
    let prefix = format!("{}-{}-{}", a.op, a.size, std::process::id());
    if a.op != "put" {
        for i in 0..keyset {
            c.put_object()
                .bucket(&a.bucket)
                .key(format!("{prefix}/{i}"))
                .body(ByteStream::from(payload.clone()))
                .send()
                .await
                .context("preparing objects")?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let started = Instant::now();
    let a = Arc::new(a);
    let mut tasks = Vec::new();
    for t in 0..a.concurrency {
        let (c, a, payload, prefix) = (c.clone(), a.clone(), payload.clone(), prefix.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut bytes = 0u64;
            let mut errors = 0u64;
            let mut i = 0u64;
            // The open loop's schedule: this task's share of `rate`, staggered.
            let every =
                (a.rate > 0.0).then(|| Duration::from_secs_f64(a.concurrency as f64 / a.rate));
            let mut next = Instant::now()
                + every.map_or(Duration::ZERO, |e| {
                    e.mul_f64(t as f64 / a.concurrency as f64)
                });
            while Instant::now() < deadline {
                if every.is_some() {
                    tokio::time::sleep_until(next.into()).await;
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                let scheduled = next;
                if let Some(e) = every {
                    next += e;
                }
                let is_put = match a.op.as_str() {
                    "put" => true,
                    "get" => false,
                    _ => rand::rng().random_bool(0.5),
                };
                let key = if a.op == "put" {
                    format!("{prefix}/{t}-{i}")
                } else {
                    format!("{prefix}/{}", rand::rng().random_range(0..keyset))
                };
                i += 1;
                let t0 = if every.is_some() {
                    scheduled
                } else {
                    Instant::now()
                };
                let sent = Instant::now();
                let outcome: Result<(), String> = if is_put {
                    c.put_object()
                        .bucket(&a.bucket)
                        .key(&key)
                        .body(ByteStream::from(payload.clone()))
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("{:?}", aws_sdk_s3::error::DisplayErrorContext(e)))
                } else {
                    match c.get_object().bucket(&a.bucket).key(&key).send().await {
                        Ok(o) => match o.body.collect().await.map(|b| b.into_bytes().len()) {
                            Ok(n) if n == a.size => Ok(()),
                            Ok(n) => Err(format!("{n} bytes read, {} expected", a.size)),
                            Err(e) => Err(e.to_string()),
                        },
                        Err(e) => Err(format!("{:?}", aws_sdk_s3::error::DisplayErrorContext(e))),
                    }
                };
                let took = sent.elapsed();
                if a.show_slow_ms > 0
                    && (outcome.is_err() || took >= Duration::from_millis(a.show_slow_ms))
                {
                    eprintln!(
                        "{} {key}: {:.1} ms after {:.3} s{}",
                        if is_put { "PUT" } else { "GET" },
                        took.as_secs_f64() * 1000.0,
                        started.elapsed().as_secs_f64(),
                        outcome
                            .as_ref()
                            .err()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    );
                }
                let ok = outcome.is_ok();
                if ok {
                    lat.push(t0.elapsed());
                    bytes += a.size as u64;
                } else {
                    errors += 1;
                }
            }
            (lat, bytes, errors)
        }));
    }
    let mut lat = Vec::new();
    let (mut bytes, mut errors) = (0u64, 0u64);
    for t in tasks {
        let (l, b, e) = t.await?;
        lat.extend(l);
        bytes += b;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    let out = serde_json::json!({
        "label": a.label, "op": a.op, "size": a.size, "concurrency": a.concurrency,
        "ops": lat.len(), "errors": errors,
        "ops_per_s": lat.len() as f64 / elapsed,
        "mib_per_s": bytes as f64 / elapsed / (1024.0 * 1024.0),
        "p50_ms": percentile(&lat, 0.50),
        "p99_ms": percentile(&lat, 0.99),
    });
    println!("{out}");
    Ok(())
}
