//! Istio's cluster naming: `outbound|<port>|<subset>|<host>` (reference §5.5).

/// `outbound|port|subset|host`.
pub fn outbound(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// Istio's mTLS SNI and a gateway's SNI-DNAT cluster name: `outbound_.port_.subset_.host`
/// (`model.BuildDNSSrvSubsetKey`).
pub fn sni_dnat(port: u16, subset: &str, host: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{host}")
}

/// Splits an `outbound|port|subset|host` name.
pub fn parse_outbound(name: &str) -> Option<(u16, &str, &str)> {
    let mut parts = name.splitn(4, '|');
    if parts.next()? != "outbound" {
        return None;
    }
    let port = parts.next()?.parse().ok()?;
    let subset = parts.next()?;
    let host = parts.next()?;
    Some((port, subset, host))
}

/// Resolves a host written in config (`echo`, `echo.default`, `echo.default.svc`, FQDN) relative
/// to the config's namespace, as Istio does for short names.
pub fn resolve_host(host: &str, namespace: &str) -> String {
    let suffix = crate::registry::model::DOMAIN_SUFFIX;
    if host.contains('*') || host.ends_with(suffix) {
        return host.to_string();
    }
    match host.split('.').count() {
        1 => format!("{host}.{namespace}.svc.{suffix}"),
        2 => format!("{host}.svc.{suffix}"),
        3 if host.ends_with(".svc") => format!("{host}.{suffix}"),
        _ => host.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = outbound(8080, "v1", "echo.default.svc.cluster.local");
        assert_eq!(n, "outbound|8080|v1|echo.default.svc.cluster.local");
        assert_eq!(parse_outbound(&n), Some((8080, "v1", "echo.default.svc.cluster.local")));
        assert_eq!(parse_outbound("inbound|80||x"), None);
        assert_eq!(
            sni_dnat(5000, "", "helloworld.sample.svc.cluster.local"),
            "outbound_.5000_._.helloworld.sample.svc.cluster.local"
        );
    }

    #[test]
    fn short_hosts_resolve_in_the_config_namespace() {
        assert_eq!(resolve_host("echo", "default"), "echo.default.svc.cluster.local");
        assert_eq!(resolve_host("echo.other", "default"), "echo.other.svc.cluster.local");
        assert_eq!(
            resolve_host("echo.other.svc.cluster.local", "default"),
            "echo.other.svc.cluster.local"
        );
        assert_eq!(resolve_host("www.example.com", "default"), "www.example.com");
    }
}
