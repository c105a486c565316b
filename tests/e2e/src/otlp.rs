//! A minimal OTLP/HTTP collector for tests: accepts every POST and records it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// Every POST a collector received, as (path, body).
pub type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal OTLP/HTTP collector: records (path, body) of every POST.
pub fn collector() -> (String, Received) {
    let (port, got) = collector_on("127.0.0.1");
    (format!("http://127.0.0.1:{port}"), got)
}

/// [`collector`] listening on `ip` (such as `0.0.0.0`, for nodes in network
/// namespaces that reach the test through the bridge); returns its port.
pub fn collector_on(ip: &str) -> (u16, Received) {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut s) = stream else { continue };
            let g = g.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h == "\r\n" || h.is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    r.read_exact(&mut body).unwrap();
                    g.lock().unwrap().push((path, body));
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n");
                }
            });
        }
    });
    (port, got)
}

/// Whether one recorded `/v1/traces` body contains every one of `needles`.
pub fn one_export_contains(got: &Received, needles: &[&[u8]]) -> bool {
    got.lock().is_ok_and(|g| {
        g.iter()
            .filter(|(p, _)| p == "/v1/traces")
            .any(|(_, b)| needles.iter().all(|n| b.windows(n.len()).any(|w| w == *n)))
    })
}

/// Whether any recorded `/v1/traces` body contains every one of `needles`.
pub fn traces_contain(got: &Received, needles: &[&[u8]]) -> bool {
    let all: Vec<u8> = got
        .lock()
        .map(|g| {
            g.iter()
                .filter(|(p, _)| p == "/v1/traces")
                .flat_map(|(_, b)| b.clone())
                .collect()
        })
        .unwrap_or_default();
    needles
        .iter()
        .all(|n| all.windows(n.len()).any(|w| w == *n))
}
