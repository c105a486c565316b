//! AWS Signature Version 4 verification (header form) for the non-S3 front ends (KV).
//! S3 requests are verified by s3s; this covers the same scheme so that any SigV4
//! signer (AWS SDKs, `curl --aws-sigv4`, botocore) can call the KV API.
//!
//! Both URI encodings in use are accepted: the path as sent (S3 style) and the path
//! encoded once more (what SDKs do for every other service).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Largest clock difference accepted between client and server.
pub const MAX_SKEW_SECS: i64 = 15 * 60;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    #[error("the Authorization header is missing")]
    Missing,
    #[error("the Authorization header is malformed: {0}")]
    Malformed(&'static str),
    #[error("the difference between the request time and the server's time is too large")]
    TimeTooSkewed,
    #[error("the request signature we calculated does not match the signature you provided")]
    Mismatch,
    #[error("the provided x-amz-content-sha256 does not match the body")]
    ContentSha256Mismatch,
    /// A header that changes the request's meaning was sent but not signed.
    #[error("header {0} must be signed (list it in SignedHeaders)")]
    UnsignedHeader(String),
}

/// Whether a request header must be covered by the signature when present: every
/// `x-amz-*` and `x-granary-*` header, `content-type`, and the conditional headers.
/// Unsigned, they could be stripped from or added to a captured request (replayed
/// within the clock-skew window) without invalidating its signature.
pub fn must_be_signed(name: &str) -> bool {
    name.starts_with("x-amz-")
        || name.starts_with("x-granary-")
        || matches!(name, "content-type" | "if-match" | "if-none-match")
}

/// The parsed `Authorization: AWS4-HMAC-SHA256 ...` header.
#[derive(Debug, PartialEq, Eq)]
pub struct Authorization<'a> {
    pub access_key_id: &'a str,
    pub date: &'a str,
    pub region: &'a str,
    pub service: &'a str,
    pub signed_headers: Vec<&'a str>,
    pub signature: &'a str,
}

pub fn parse_authorization(v: &str) -> Result<Authorization<'_>, SigError> {
    let rest = v
        .strip_prefix("AWS4-HMAC-SHA256")
        .ok_or(SigError::Malformed("unsupported algorithm"))?;
    let (mut cred, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(c) = part.strip_prefix("Credential=") {
            cred = Some(c);
        } else if let Some(s) = part.strip_prefix("SignedHeaders=") {
            signed = Some(s);
        } else if let Some(s) = part.strip_prefix("Signature=") {
            sig = Some(s);
        }
    }
    let cred = cred.ok_or(SigError::Malformed("no Credential"))?;
    let mut c = cred.split('/');
    let (Some(ak), Some(date), Some(region), Some(service), Some("aws4_request"), None) =
        (c.next(), c.next(), c.next(), c.next(), c.next(), c.next())
    else {
        return Err(SigError::Malformed("bad Credential scope"));
    };
    let signature = sig.ok_or(SigError::Malformed("no Signature"))?;
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SigError::Malformed("bad Signature"));
    }
    let signed_headers: Vec<&str> = signed
        .ok_or(SigError::Malformed("no SignedHeaders"))?
        .split(';')
        .collect();
    if !signed_headers.contains(&"host") {
        return Err(SigError::Malformed("the host header must be signed"));
    }
    Ok(Authorization {
        access_key_id: ak,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

/// The SigV4 signing key of a secret for one day, region and service.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    key = hmac(&key, region.as_bytes());
    key = hmac(&key, service.as_bytes());
    hmac(&key, b"aws4_request")
}

/// Whether `signature` (hex) is the SigV4 signature of a POST policy (its base64 text
/// is the string to sign) under the signing key of `secret`, `date`, `region`, `service`.
/// Compared in constant time.
pub fn verify_policy(
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    policy_b64: &str,
    signature: &str,
) -> bool {
    let key = signing_key(secret, date, region, service);
    let Ok(expected) = hex::decode(signature) else {
        return false;
    };
    let Ok(mut m) = <HmacSha256 as Mac>::new_from_slice(&key) else {
        return false;
    };
    m.update(policy_b64.as_bytes());
    m.verify_slice(&expected).is_ok()
}

/// The SigV4 signature (hex) of a POST policy, as a client computes it.
pub fn sign_policy(
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    policy_b64: &str,
) -> String {
    hex::encode(hmac(
        &signing_key(secret, date, region, service),
        policy_b64.as_bytes(),
    ))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn uri_encode(s: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn canonical_query(query: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Everything of a request that its signature covers, and the scope it must be
/// signed for.
pub struct SignedRequest<'a> {
    /// The region and service the credential scope must name.
    pub region: &'a str,
    pub service: &'a str,
    pub method: &'a str,
    /// The path exactly as sent (percent-encoded).
    pub raw_path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub body: &'a [u8],
    pub now_unix: i64,
}

pub(crate) fn parse_amz_date(s: &str) -> Option<i64> {
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::PrimitiveDateTime::parse(s, &fmt)
        .ok()
        .map(|t| t.assume_utc().unix_timestamp())
}

/// Checks everything of a request that needs neither its body nor the secret key: the
/// date and clock skew, the credential scope component by component (date equal to
/// the request's date, region, service, terminator) and that every header
/// [`must_be_signed`] is signed. Returns the request's `x-amz-date`.
pub fn check_head<'r>(
    req: &SignedRequest<'r>,
    auth: &Authorization<'_>,
) -> Result<&'r str, SigError> {
    let amz_date = req
        .headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or(SigError::Malformed("x-amz-date is required"))?;
    let t = parse_amz_date(amz_date).ok_or(SigError::Malformed("bad x-amz-date"))?;
    if (t - req.now_unix).abs() > MAX_SKEW_SECS {
        return Err(SigError::TimeTooSkewed);
    }
    if amz_date.get(..8) != Some(auth.date) {
        return Err(SigError::Malformed(
            "the credential scope date differs from the date of x-amz-date",
        ));
    }
    if auth.region != req.region {
        return Err(SigError::Malformed(
            "the credential scope names another region than this cluster's",
        ));
    }
    if auth.service != req.service {
        return Err(SigError::Malformed(
            "the credential scope names another service (expected kv)",
        ));
    }
    for name in req.headers.keys() {
        let name = name.as_str();
        if must_be_signed(name) && !auth.signed_headers.contains(&name) {
            return Err(SigError::UnsignedHeader(name.to_string()));
        }
    }
    Ok(amz_date)
}

/// Verifies the request against `secret`. The caller looked up `secret` from
/// `parse_authorization(..).access_key_id`.
pub fn verify(
    req: &SignedRequest<'_>,
    auth: &Authorization<'_>,
    secret: &str,
) -> Result<(), SigError> {
    let body_hash = hex::encode(Sha256::digest(req.body));
    let payload_hash = match req
        .headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok())
    {
        Some("UNSIGNED-PAYLOAD") => "UNSIGNED-PAYLOAD".to_string(),
        Some(h) => {
            if !h.eq_ignore_ascii_case(&body_hash) {
                return Err(SigError::ContentSha256Mismatch);
            }
            h.to_string()
        }
        None => body_hash,
    };
    verify_with_payload_hash(req, auth, secret, &payload_hash)
}

/// Verifies the signature with `payload_hash` standing for the body (the value of
/// `x-amz-content-sha256`, checked against the body by the caller, or the body's hash).
/// Lets a front end authenticate a request before reading its body.
pub fn verify_with_payload_hash(
    req: &SignedRequest<'_>,
    auth: &Authorization<'_>,
    secret: &str,
    payload_hash: &str,
) -> Result<(), SigError> {
    let amz_date = check_head(req, auth)?;
    let mut canon_headers = String::new();
    for name in &auth.signed_headers {
        let values: Vec<String> = req
            .headers
            .get_all(*name)
            .iter()
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        if values.is_empty() {
            return Err(SigError::Malformed("a signed header is missing"));
        }
        canon_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let key = signing_key(secret, auth.date, auth.region, auth.service);
    let query = canonical_query(req.query);
    let path = if req.raw_path.is_empty() {
        "/"
    } else {
        req.raw_path
    };
    for uri in [path.to_string(), uri_encode(path.as_bytes(), true)] {
        let canonical = format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            req.method,
            uri,
            query,
            canon_headers,
            auth.signed_headers.join(";"),
            payload_hash
        );
        let sts = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(&key).expect("HMAC takes keys of any length");
        m.update(sts.as_bytes());
        let Ok(expected) = hex::decode(auth.signature) else {
            return Err(SigError::Mismatch);
        };
        if m.verify_slice(&expected).is_ok() {
            return Ok(());
        }
    }
    Err(SigError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `get-vanilla` case of AWS's SigV4 test suite.
    #[test]
    fn aws_test_suite_get_vanilla() {
        let mut h = http::HeaderMap::new();
        h.insert("host", "example.amazonaws.com".parse().unwrap());
        h.insert("x-amz-date", "20150830T123600Z".parse().unwrap());
        let auth = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                    SignedHeaders=host;x-amz-date, \
                    Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
        let a = parse_authorization(auth).unwrap();
        let now = parse_amz_date("20150830T123600Z").unwrap();
        let req = SignedRequest {
            region: "us-east-1",
            service: "service",
            method: "GET",
            raw_path: "/",
            query: None,
            headers: &h,
            body: b"",
            now_unix: now,
        };
        verify(&req, &a, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY").unwrap();
        assert_eq!(verify(&req, &a, "wrong"), Err(SigError::Mismatch));
        let late = SignedRequest {
            now_unix: now + 3600,
            ..req
        };
        assert_eq!(
            verify(&late, &a, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            Err(SigError::TimeTooSkewed)
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert!(parse_authorization("Bearer x").is_err());
        assert!(
            parse_authorization(
                "AWS4-HMAC-SHA256 Credential=a/b/c, SignedHeaders=host, Signature=00"
            )
            .is_err()
        );
        assert!(
            parse_authorization(
                "AWS4-HMAC-SHA256 Credential=a/20150830/r/s/aws4_request, SignedHeaders=x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
            )
            .is_err(),
            "host must be signed"
        );
    }

    fn head(extra: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("host", "example.amazonaws.com".parse().unwrap());
        h.insert("x-amz-date", "20150830T123600Z".parse().unwrap());
        for (k, v) in extra {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn check(h: &http::HeaderMap, auth: &str) -> Result<(), SigError> {
        let a = parse_authorization(auth)?;
        let req = SignedRequest {
            region: "us-east-1",
            service: "kv",
            method: "PUT",
            raw_path: "/kv/v1/ns/k",
            query: None,
            headers: h,
            body: b"",
            now_unix: parse_amz_date("20150830T123600Z").unwrap(),
        };
        check_head(&req, &a).map(|_| ())
    }

    const SIG: &str = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";

    /// A captured request must not be replayable with its compare-and-set condition
    /// stripped, a TTL added or its content type changed: those headers must be signed.
    #[test]
    fn meaningful_headers_must_be_signed() {
        let auth = |signed: &str| {
            format!(
                "AWS4-HMAC-SHA256 Credential=AK/20150830/us-east-1/kv/aws4_request, \
                 SignedHeaders={signed}, Signature={SIG}"
            )
        };
        for (name, value) in [
            ("if-match", "3"),
            ("if-none-match", "*"),
            ("x-granary-ttl", "60"),
            ("x-granary-anything", "x"),
            ("content-type", "text/plain"),
            ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
            ("x-amz-meta-a", "b"),
        ] {
            let h = head(&[(name, value)]);
            assert_eq!(
                check(&h, &auth("host;x-amz-date")),
                Err(SigError::UnsignedHeader(name.into())),
                "{name}"
            );
            assert_eq!(
                check(&h, &auth(&format!("host;x-amz-date;{name}"))),
                Ok(()),
                "{name}"
            );
        }
        // x-amz-date itself is an x-amz-* header.
        assert_eq!(
            check(&head(&[]), &auth("host")),
            Err(SigError::UnsignedHeader("x-amz-date".into()))
        );
        // Headers that do not change the meaning may stay unsigned.
        let h = head(&[
            ("user-agent", "x"),
            ("accept", "*/*"),
            ("x-amzn-trace-id", "1"),
        ]);
        assert_eq!(check(&h, &auth("host;x-amz-date")), Ok(()));
    }

    /// The credential scope is checked component by component, not by prefix.
    #[test]
    fn the_credential_scope_must_match_exactly() {
        let h = head(&[]);
        let auth = |scope: &str| {
            format!(
                "AWS4-HMAC-SHA256 Credential=AK/{scope}/aws4_request, \
                 SignedHeaders=host;x-amz-date, Signature={SIG}"
            )
        };
        assert_eq!(check(&h, &auth("20150830/us-east-1/kv")), Ok(()));
        for bad in [
            "2015083/us-east-1/kv",
            "2015/us-east-1/kv",
            "/us-east-1/kv",
            "20150831/us-east-1/kv",
            "20150830T123600Z/us-east-1/kv",
            "20150830/eu-west-1/kv",
            "20150830/us-east-1/s3",
            "20150830/us-east-1/KV",
        ] {
            assert!(
                matches!(check(&h, &auth(bad)), Err(SigError::Malformed(_))),
                "{bad} accepted"
            );
        }
        assert!(check(&h, &auth("20150830/us-east-1/kv/extra")).is_err());
        assert!(
            parse_authorization(&format!(
                "AWS4-HMAC-SHA256 Credential=AK/20150830/us-east-1/kv/aws5_request, \
                 SignedHeaders=host;x-amz-date, Signature={SIG}"
            ))
            .is_err()
        );
    }

    #[test]
    fn query_is_canonicalised() {
        assert_eq!(canonical_query(Some("b=2&a=1&c=x%20y")), "a=1&b=2&c=x%20y");
        assert_eq!(canonical_query(Some("prefix=a+b")), "prefix=a%2Bb");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever a client sends as Authorization, parsing answers without panicking,
        /// and verification of anything parsed answers without panicking.
        #[test]
        fn arbitrary_authorization_headers_never_panic(s in ".{0,300}") {
            if let Ok(a) = parse_authorization(&s) {
                let h = http::HeaderMap::new();
                let req = SignedRequest { region: "us-east-1", service: "s3", method: "GET", raw_path: "/", query: None, headers: &h, body: b"", now_unix: 0 };
                let _ = verify(&req, &a, "secret");
            }
        }

        #[test]
        fn structured_garbage_never_panics(ak in "[A-Z0-9]{0,20}", date in "[0-9]{0,9}", sig in "[0-9a-f]{0,70}", hdrs in "[a-z;-]{0,40}") {
            let s = format!("AWS4-HMAC-SHA256 Credential={ak}/{date}/us-east-1/s3/aws4_request, SignedHeaders={hdrs}, Signature={sig}");
            let _ = parse_authorization(&s);
        }

        /// Whatever headers a request carries, a header that must be signed but is not
        /// listed in SignedHeaders is refused before the signature is even computed.
        #[test]
        fn unsigned_meaningful_headers_are_always_refused(
            extra in proptest::collection::vec(("(x-amz-|x-granary-|if-|content-|x-)[a-z-]{0,12}", "[ -~]{0,20}"), 0..6),
            signed_mask in proptest::collection::vec(any::<bool>(), 6),
        ) {
            let mut h = http::HeaderMap::new();
            h.insert("host", "h".parse().unwrap());
            h.insert("x-amz-date", "20150830T123600Z".parse().unwrap());
            let mut signed = vec!["host".to_string(), "x-amz-date".to_string()];
            for (i, (k, v)) in extra.iter().enumerate() {
                let (Ok(name), Ok(value)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(v)) else { continue };
                h.insert(name, value);
                if signed_mask[i] && !signed.contains(k) {
                    signed.push(k.clone());
                }
            }
            let auth = format!("AWS4-HMAC-SHA256 Credential=AK/20150830/us-east-1/kv/aws4_request, SignedHeaders={}, Signature={}", signed.join(";"), "0".repeat(64));
            let a = parse_authorization(&auth).unwrap();
            let req = SignedRequest { region: "us-east-1", service: "kv", method: "PUT", raw_path: "/", query: None, headers: &h, body: b"", now_unix: parse_amz_date("20150830T123600Z").unwrap() };
            let unsigned = h.keys().map(|k| k.as_str()).find(|k| must_be_signed(k) && !signed.iter().any(|s| s == k));
            match (unsigned, verify(&req, &a, "secret")) {
                (Some(_), r) => prop_assert!(matches!(r, Err(SigError::UnsignedHeader(_)) | Err(SigError::ContentSha256Mismatch)), "{r:?}"),
                (None, r) => prop_assert!(!matches!(r, Err(SigError::UnsignedHeader(_))), "{r:?}"),
            }
        }

        #[test]
        fn query_canonicalisation_never_panics(q in ".{0,200}") {
            let _ = canonical_query(Some(&q));
            let _ = percent_decode(&q);
        }
    }
}
