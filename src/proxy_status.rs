//! `meshd proxy-status`: the proxies connected to one or more meshd replicas and, per xDS type,
//! whether each has what meshd last sent, as `istioctl proxy-status` shows it:
//! `SYNCED` (the last response was ACKed), `NOT SENT` (nothing sent of that type), `STALE`
//! (sent and not ACKed yet, or NACKed). Read from each replica's `/debug/syncz` on 15014.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

/// The xDS types shown, in istioctl's column order.
pub const TYPES: [&str; 5] = ["cds", "lds", "eds", "rds", "sds"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ProxyStatusArgs {
    /// Monitoring address of each replica (`/debug/syncz`), comma-separated.
    #[arg(long = "meshd-url", value_delimiter = ',', default_value = "http://127.0.0.1:15014")]
    pub urls: Vec<String>,
    /// A bearer token for replicas reached off loopback (a system-namespace identity).
    #[arg(long)]
    pub token: Option<PathBuf>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// What `/debug/syncz` says of one type on one stream.
#[derive(Debug, Clone, Default, Deserialize)]
struct TypeSync {
    nonce_sent: Option<String>,
    nonce_acked: Option<String>,
    nacks: u64,
    last_nack: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct ConnSync {
    node_id: String,
    cluster_id: String,
    #[serde(default)]
    types: BTreeMap<String, TypeSync>,
}

/// One type's state for a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Sync {
    #[serde(rename = "SYNCED")]
    Synced,
    #[serde(rename = "NOT SENT")]
    NotSent,
    #[serde(rename = "STALE")]
    Stale,
}

impl Sync {
    fn of(t: Option<&TypeSync>) -> Self {
        match t {
            None => Sync::NotSent,
            Some(t) => match (&t.nonce_sent, &t.nonce_acked) {
                (None, _) => Sync::NotSent,
                (Some(sent), Some(acked)) if sent == acked => Sync::Synced,
                _ => Sync::Stale,
            },
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Sync::Synced => "SYNCED",
            Sync::NotSent => "NOT SENT",
            Sync::Stale => "STALE",
        }
    }
}

/// One row: a proxy connected to one replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyRow {
    /// `<pod>.<namespace>` from the node id (the whole id when it has another shape).
    pub name: String,
    pub node_id: String,
    pub cluster: String,
    pub types: BTreeMap<&'static str, Sync>,
    /// The last NACK's message, if the proxy rejected something.
    pub last_nack: Option<String>,
    pub meshd: String,
}

fn name_of(node_id: &str) -> String {
    node_id.split('~').nth(2).unwrap_or(node_id).to_string()
}

fn rows_of(conns: Vec<ConnSync>, replica: &str) -> Vec<ProxyRow> {
    conns
        .into_iter()
        .map(|c| ProxyRow {
            name: name_of(&c.node_id),
            cluster: c.cluster_id,
            types: TYPES.iter().map(|t| (*t, Sync::of(c.types.get(*t)))).collect(),
            last_nack: c
                .types
                .values()
                .filter(|t| t.nacks > 0)
                .find_map(|t| t.last_nack.clone()),
            node_id: c.node_id,
            meshd: replica.to_string(),
        })
        .collect()
}

/// The rows of every replica, sorted by proxy name.
pub async fn collect(urls: &[String], token: Option<&str>) -> anyhow::Result<Vec<ProxyRow>> {
    let mut rows = Vec::new();
    for url in urls {
        let body = get(url, "/debug/syncz", token)
            .await
            .with_context(|| format!("reading {url}/debug/syncz"))?;
        let conns: Vec<ConnSync> =
            serde_json::from_str(&body).with_context(|| format!("{url}/debug/syncz is not meshd's syncz JSON"))?;
        rows.extend(rows_of(conns, url));
    }
    rows.sort_by(|a, b| (&a.name, &a.meshd).cmp(&(&b.name, &b.meshd)));
    Ok(rows)
}

/// istioctl's table.
pub fn render_table(rows: &[ProxyRow]) -> String {
    let mut table: Vec<Vec<String>> = vec![
        ["NAME", "CLUSTER", "CDS", "LDS", "EDS", "RDS", "SDS", "MESHD"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    ];
    for r in rows {
        let mut line = vec![r.name.clone(), r.cluster.clone()];
        line.extend(TYPES.iter().map(|t| r.types[t].as_str().to_string()));
        line.push(r.meshd.clone());
        table.push(line);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|i| table.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for line in table {
        let cells: Vec<String> = line.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// An HTTP/1.1 GET of `path` at `url` (`http://host:port`), with an optional bearer token.
async fn get(url: &str, path: &str, token: Option<&str>) -> anyhow::Result<String> {
    let authority = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs (meshd's monitoring port is plain HTTP)"))?
        .trim_end_matches('/');
    let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(authority))
        .await
        .with_context(|| format!("{authority}: no connection within 10s"))??;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::get(path).header("host", authority);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        send.send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new())?),
    )
    .await
    .context("no answer within 10s")??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("HTTP {status}: {}", text.trim());
    }
    Ok(text)
}

pub async fn run(args: ProxyStatusArgs) -> anyhow::Result<()> {
    let token = match &args.token {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let rows = collect(&args.urls, token.as_deref()).await?;
    match args.output {
        Output::Table => print!("{}", render_table(&rows)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_nonces() {
        let t = |sent: Option<&str>, acked: Option<&str>| TypeSync {
            nonce_sent: sent.map(str::to_string),
            nonce_acked: acked.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(Sync::of(None), Sync::NotSent);
        assert_eq!(Sync::of(Some(&t(None, None))), Sync::NotSent);
        assert_eq!(Sync::of(Some(&t(Some("a-1"), Some("a-1")))), Sync::Synced);
        assert_eq!(Sync::of(Some(&t(Some("a-2"), Some("a-1")))), Sync::Stale);
        assert_eq!(Sync::of(Some(&t(Some("a-2"), None))), Sync::Stale);
    }

    #[test]
    fn rows_and_table() {
        let conns: Vec<ConnSync> = serde_json::from_str(
            r#"[{"node_id": "sidecar~10.0.0.1~web-1.default~default.svc.cluster.local", "cluster_id": "cluster2",
                 "types": {"cds": {"nonce_sent": "n1", "nonce_acked": "n1", "nacks": 0},
                           "eds": {"nonce_sent": "n3", "nonce_acked": "n2", "nacks": 1, "last_nack": "bad"}}}]"#,
        )
        .unwrap();
        let rows = rows_of(conns, "http://127.0.0.1:15014");
        assert_eq!(rows[0].name, "web-1.default");
        assert_eq!(rows[0].types["cds"], Sync::Synced);
        assert_eq!(rows[0].types["eds"], Sync::Stale);
        assert_eq!(rows[0].types["lds"], Sync::NotSent);
        assert_eq!(rows[0].last_nack.as_deref(), Some("bad"));
        let table = render_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAME") && lines[0].contains("CDS"));
        assert!(lines[1].starts_with("web-1.default") && lines[1].contains("SYNCED") && lines[1].contains("NOT SENT"));
    }
}
