//! `granary-operator smoke-test`: what the chart's `helm test` hook runs. Against one
//! StorageCluster it registers a throwaway tenant through the admin API, writes a KV
//! entry through the cluster's KV endpoint (signed with the tenant's new key, as any
//! client would), reads it back, and removes the tenant and its data again, whatever
//! happened in between.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use kube::{Api, Client};
use serde_json::json;

use crate::build::cluster::Context as BuildContext;
use crate::controller::{Context, Metrics, cluster_admin, tenant::client_endpoints};
use crate::crd::StorageCluster;

/// Runs the smoke test against StorageCluster `namespace/cluster`; prints each step.
pub async fn run(client: Client, namespace: &str, cluster: &str) -> anyhow::Result<()> {
    let sc = Api::<StorageCluster>::namespaced(client.clone(), namespace)
        .get(cluster)
        .await
        .with_context(|| format!("reading StorageCluster {namespace}/{cluster}"))?;
    let ctx = Context::new(client, Arc::new(Metrics::default()), namespace.to_string());
    let b = BuildContext::of(&sc, namespace);
    let admin = cluster_admin(&ctx, &sc, &b).await?.ok_or_else(|| {
        anyhow!(
            "the admin token Secret {} does not exist yet",
            b.admin_token_secret()
        )
    })?;
    let (_, kv) = client_endpoints(&sc, &b);
    let tenant = format!("helm-test-{}", hex::encode(rand::random::<[u8; 4]>()));
    println!("registering tenant {tenant} on {namespace}/{cluster}");
    // Create-only: an existing tenant of that name is never touched (nor removed below).
    let outcome = match admin.create_tenant(&tenant, &json!({})).await {
        Ok(false) => bail!("a tenant named {tenant} exists already; run the test again"),
        Ok(true) => write_and_read(&ctx.http, &admin, &tenant, &kv, &sc.spec.region).await,
        // The create may have happened even though its answer was lost: clean up.
        Err(e) => Err(e.into()),
    };
    println!("removing tenant {tenant} and its data");
    let removed = admin.delete_tenant(&tenant, true).await;
    if let Err(e) = &removed {
        eprintln!("could not remove tenant {tenant} (remove it through the admin API): {e}");
    }
    outcome?;
    removed?;
    println!("ok: wrote and read back a KV entry through {kv}");
    Ok(())
}

async fn write_and_read(
    http: &reqwest::Client,
    admin: &crate::admin_client::AdminClient,
    tenant: &str,
    kv: &str,
    region: &str,
) -> anyhow::Result<()> {
    let (ak, sk) = admin.create_key(tenant, "helm test").await?;
    let url = format!("{}/kv/v1/helm-test/probe", kv.trim_end_matches('/'));
    let value = format!("granary helm test {tenant}");
    println!("PUT {url}");
    let put = signed(http, "PUT", &url, value.as_bytes(), (&ak, &sk), region)?
        .send()
        .await
        .with_context(|| format!("PUT {url}"))?;
    if !put.status().is_success() {
        bail!(
            "PUT {url}: {} {}",
            put.status(),
            put.text().await.unwrap_or_default()
        );
    }
    println!("GET {url}");
    let get = signed(http, "GET", &url, b"", (&ak, &sk), region)?
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = get.status();
    let body = get.bytes().await?;
    if !status.is_success() || body.as_ref() != value.as_bytes() {
        bail!(
            "GET {url}: {status}, read {:?} instead of what was written",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// A request signed with AWS Signature V4 for the KV API (service `kv`).
fn signed(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: &[u8],
    (ak, sk): (&str, &str),
    region: &str,
) -> anyhow::Result<reqwest::RequestBuilder> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let mut headers = vec![(
        "content-type".to_string(),
        "application/octet-stream".to_string(),
    )];
    let identity =
        aws_credential_types::Credentials::new(ak, sk, None, None, "granary-smoke-test").into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("kv")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()?
        .into();
    let request = SignableRequest::new(
        method,
        url,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(body),
    )?;
    let (instructions, _) = sign(request, &params)?.into_parts();
    for (k, v) in instructions.headers() {
        headers.push((k.to_string(), v.to_string()));
    }
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    let mut rb = http
        .request(method, url)
        .timeout(Duration::from_secs(30))
        .body(body.to_vec());
    for (k, v) in headers {
        rb = rb.header(k, v);
    }
    Ok(rb)
}
