//! Client of a storage cluster's admin API (`/admin/v1`, see docs/admin-api.md).

use serde_json::{Value, json};

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    pub fn new(http: reqwest::Client, base: &str, token: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut r = self
            .http
            .request(method, format!("{}/admin/v1{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(std::time::Duration::from_secs(15));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r
            .send()
            .await
            .map_err(|e| Error::Admin(format!("{}: {e}", self.base)))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| Error::Admin(e.to_string()))?;
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, v))
    }

    fn fail(what: &str, status: u16, v: &Value) -> Error {
        Error::Admin(format!(
            "{what}: HTTP {status}: {}",
            v.get("message").and_then(Value::as_str).unwrap_or("")
        ))
    }

    /// Creates the tenant or replaces its settings.
    pub async fn upsert_tenant(&self, name: &str, spec: &Value) -> Result<()> {
        if self.update_existing_tenant(name, spec).await? || self.create_tenant(name, spec).await? {
            return Ok(());
        }
        Err(Self::fail(
            "creating tenant",
            409,
            &json!({"message": "created concurrently; retried on the next reconcile"}),
        ))
    }

    /// Creates a tenant; false (nothing changed) when one of that name exists.
    pub async fn create_tenant(&self, name: &str, spec: &Value) -> Result<bool> {
        let mut body = spec.clone();
        body["name"] = json!(name);
        let (s, v) = self
            .call(reqwest::Method::POST, "/tenants", Some(body))
            .await?;
        match s {
            201 => Ok(true),
            409 => Ok(false),
            _ => Err(Self::fail("creating tenant", s, &v)),
        }
    }

    /// Replaces the settings of a tenant the cluster knows; false (nothing done) when it
    /// does not know it (never registered: nothing to suspend).
    pub async fn update_existing_tenant(&self, name: &str, spec: &Value) -> Result<bool> {
        let (s, v) = self
            .call(
                reqwest::Method::PUT,
                &format!("/tenants/{name}"),
                Some(spec.clone()),
            )
            .await?;
        match s {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(Self::fail("updating tenant", s, &v)),
        }
    }

    /// Whether `access_key_id` is a live key of the tenant.
    pub async fn key_is_live(&self, tenant: &str, access_key_id: &str) -> Result<bool> {
        let (s, v) = self
            .call(
                reqwest::Method::GET,
                &format!("/tenants/{tenant}/keys"),
                None,
            )
            .await?;
        if s != 200 {
            return Err(Self::fail("listing keys", s, &v));
        }
        Ok(v["keys"].as_array().is_some_and(|ks| {
            ks.iter().any(|k| {
                k["accessKeyId"].as_str() == Some(access_key_id) && k["revokedAt"].is_null()
            })
        }))
    }

    /// Issues a key; returns (access key id, secret).
    pub async fn create_key(&self, tenant: &str, description: &str) -> Result<(String, String)> {
        let (s, v) = self
            .call(
                reqwest::Method::POST,
                &format!("/tenants/{tenant}/keys"),
                Some(json!({"description": description})),
            )
            .await?;
        if s != 201 {
            return Err(Self::fail("issuing key", s, &v));
        }
        let ak = v["accessKeyId"].as_str().unwrap_or_default().to_string();
        let sk = v["secretAccessKey"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if ak.is_empty() || sk.is_empty() {
            return Err(Error::Admin("key response without credentials".into()));
        }
        Ok((ak, sk))
    }

    /// The cluster's health as one node sees it: (`/layout`, `/nodes`).
    pub async fn cluster_health(&self) -> Result<(Value, Value)> {
        let (s, layout) = self.call(reqwest::Method::GET, "/layout", None).await?;
        if s != 200 {
            return Err(Self::fail("reading the layout", s, &layout));
        }
        let (s, nodes) = self.call(reqwest::Method::GET, "/nodes", None).await?;
        if s != 200 {
            return Err(Self::fail("reading the members", s, &nodes));
        }
        Ok((layout, nodes))
    }

    /// Suspends a tenant the cluster knows, keeping its settings as stored there (never
    /// rebuilt from the Tenant's spec, which its owner may have made invalid); false when
    /// the cluster does not know it.
    pub async fn suspend_tenant(&self, tenant: &str) -> Result<bool> {
        // Nodes that have the route change the flag alone, keeping every stored field
        // (also those newer than the node).
        let (s, v) = self
            .call(
                reqwest::Method::PUT,
                &format!("/tenants/{tenant}/suspended"),
                Some(json!({"suspended": true})),
            )
            .await?;
        match s {
            200 => return Ok(true),
            404 if v["error"] == "NoSuchTenant" => return Ok(false),
            // A node from a release without the route (it answers 404 `NoSuchRoute`):
            // read, change and write back. Every such release also refuses to read a
            // spec with fields it does not know (lenient reads came with the route), so
            // nothing it does not know can be dropped this way.
            404 | 405 => {}
            _ => return Err(Self::fail("suspending tenant", s, &v)),
        }
        let (s, v) = self
            .call(reqwest::Method::GET, &format!("/tenants/{tenant}"), None)
            .await?;
        match s {
            200 => {}
            404 => return Ok(false),
            _ => return Err(Self::fail("reading tenant", s, &v)),
        }
        let mut spec = v["spec"].clone();
        if !spec.is_object() {
            return Err(Self::fail("reading tenant", s, &v));
        }
        if spec["suspended"] == json!(true) {
            return Ok(true);
        }
        spec["suspended"] = json!(true);
        self.update_existing_tenant(tenant, &spec).await
    }

    /// `{buckets, objects, storageBytes, hotBytes, coldBytes, kvKeys, ...}` of the tenant.
    pub async fn usage(&self, tenant: &str) -> Result<Value> {
        let (s, v) = self
            .call(
                reqwest::Method::GET,
                &format!("/tenants/{tenant}/usage"),
                None,
            )
            .await?;
        if s == 200 {
            Ok(v)
        } else {
            Err(Self::fail("reading usage", s, &v))
        }
    }

    pub async fn revoke_key(&self, tenant: &str, access_key_id: &str) -> Result<()> {
        let (s, v) = self
            .call(
                reqwest::Method::DELETE,
                &format!("/tenants/{tenant}/keys/{access_key_id}"),
                None,
            )
            .await?;
        if matches!(s, 204 | 404) {
            Ok(())
        } else {
            Err(Self::fail("revoking key", s, &v))
        }
    }

    /// Deletes the tenant, with all its data when `purge`; a missing tenant is fine.
    pub async fn delete_tenant(&self, tenant: &str, purge: bool) -> Result<()> {
        let (s, v) = self
            .call(
                reqwest::Method::DELETE,
                &format!("/tenants/{tenant}?purge={purge}"),
                None,
            )
            .await?;
        if matches!(s, 204 | 404) {
            Ok(())
        } else {
            Err(Self::fail("deleting tenant", s, &v))
        }
    }
}
