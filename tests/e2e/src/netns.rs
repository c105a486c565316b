//! A private network for multi-node tests: one network namespace per node, each with its
//! own address on a bridge the harness creates (the test process and the catalog stay in
//! the root namespace and reach every node through the bridge; the catalog listens on an
//! address of its own, so a node can lose the catalog and keep its clients). Links are cut and healed
//! with blackhole routes inside the namespaces (iproute2 only), so a cut drops traffic
//! in both directions without touching anything outside this network. Everything is
//! removed on drop.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, bail};

pub struct Net {
    tag: String,
    bridge: String,
    /// `198.(18|19).x.0/24`: the bridge is `.1` (and `.254` for the catalog), host `i`
    /// is `.(i + 2)`.
    prefix: [u8; 3],
    hosts: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Net {
    /// Creates `n` namespaces on a fresh bridge. Needs root (CAP_NET_ADMIN).
    pub fn create(n: usize) -> Result<Self> {
        let r: u32 = rand::random();
        let tag = format!("{:05x}", r & 0xfffff);
        // 198.18.0.0/15 is reserved for network tests (RFC 2544): no CNI, Docker or
        // Kubernetes default range overlaps it.
        let prefix = [198, 18 + (r >> 20 & 1) as u8, (r >> 8 & 0xff) as u8];
        let mut net = Net {
            bridge: format!("grb{tag}"),
            tag,
            prefix,
            hosts: Vec::new(),
        };
        let bridge = net.bridge.clone();
        ip(&["link", "add", &bridge, "type", "bridge"])
            .context("creating a bridge (multi-node tests need root and network namespaces)")?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.bridge_addr()),
            "dev",
            &bridge,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.catalog_addr()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..n {
            let ns = format!("gr{}n{i}", net.tag);
            ip(&["netns", "add", &ns])?;
            net.hosts.push(ns.clone());
            let outside = format!("grv{}{i}", net.tag);
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &outside, "master", &bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            let addr = format!("{}/24", net.addr(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// The root namespace's address on the bridge (the test process's source address).
    pub fn bridge_addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// The root namespace's second address on the bridge, where the catalog listens.
    pub fn catalog_addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, 254)
    }

    /// The subnet, e.g. for a database's allow list.
    pub fn subnet(&self) -> String {
        let [a, b, c] = self.prefix;
        format!("{a}.{b}.{c}.0/24")
    }

    pub fn addr(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, i as u8 + 2)
    }

    pub fn namespace(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Drops all traffic between host `a` and `addr` (both directions, as seen from `a`).
    fn blackhole(&self, a: usize, addr: Ipv4Addr, add: bool) -> Result<()> {
        let route = format!("{addr}/32");
        let verb = if add { "add" } else { "del" };
        ip(&["-n", &self.hosts[a], "route", verb, "blackhole", &route])
    }

    /// Cuts the link between hosts `a` and `b`.
    pub fn cut(&self, a: usize, b: usize) -> Result<()> {
        self.blackhole(a, self.addr(b), true)?;
        self.blackhole(b, self.addr(a), true)
    }

    pub fn heal(&self, a: usize, b: usize) -> Result<()> {
        self.blackhole(a, self.addr(b), false)?;
        self.blackhole(b, self.addr(a), false)
    }

    /// Cuts host `a` off from the root namespace (the catalog and the test process).
    pub fn isolate_from_root(&self, a: usize, isolated: bool) -> Result<()> {
        self.blackhole(a, self.bridge_addr(), isolated)?;
        self.blackhole(a, self.catalog_addr(), isolated)
    }

    /// Cuts host `a` off from the catalog only (its clients still reach it).
    pub fn isolate_from_catalog(&self, a: usize, isolated: bool) -> Result<()> {
        self.blackhole(a, self.catalog_addr(), isolated)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.hosts {
            // Deleting the namespace removes its end of the veth pair and so both ends.
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
