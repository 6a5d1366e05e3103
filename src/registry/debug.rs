//! `/debug/registryz`: the current snapshot as JSON, for people and tests.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::model::{Endpoint, Locality, Protocol, Service};
use super::store::Snapshot;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryDump {
    pub version: u64,
    pub services: Vec<ServiceDump>,
    pub config: ConfigDump,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDump {
    pub hostname: String,
    /// False for hosts that have endpoints but no Service in any cluster.
    pub defined: bool,
    pub namespace: String,
    pub name: String,
    pub ports: Vec<PortDump>,
    pub labels: BTreeMap<String, String>,
    pub cluster_ips: BTreeMap<String, Vec<String>>,
    pub endpoints: Vec<EndpointDump>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortDump {
    pub name: String,
    pub port: u16,
    pub protocol: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointDump {
    pub cluster: String,
    pub address: String,
    pub port: u16,
    pub port_name: String,
    pub labels: BTreeMap<String, String>,
    pub locality: LocalityDump,
    pub network: String,
    pub service_account: Option<String>,
    pub pod: Option<String>,
    pub ready: bool,
}

#[derive(Debug, Serialize)]
pub struct LocalityDump {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// `namespace/name` of every config object, per kind.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    pub gateways: Vec<String>,
    pub virtual_services: Vec<String>,
    pub destination_rules: Vec<String>,
}

/// Istio's protocol names.
pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Http => "HTTP",
        Protocol::Http2 => "HTTP2",
        Protocol::Grpc => "GRPC",
        Protocol::Https => "HTTPS",
        Protocol::Tls => "TLS",
        Protocol::Tcp => "TCP",
        Protocol::Unknown => "UNKNOWN",
    }
}

fn locality(l: &Locality) -> LocalityDump {
    LocalityDump {
        region: l.region.clone(),
        zone: l.zone.clone(),
        subzone: l.subzone.clone(),
    }
}

fn endpoint(e: &Endpoint) -> EndpointDump {
    EndpointDump {
        cluster: e.cluster_id.clone(),
        address: e.address.to_string(),
        port: e.port,
        port_name: e.service_port_name.clone(),
        labels: e.labels.clone(),
        locality: locality(&e.locality),
        network: e.network.clone(),
        service_account: e.service_account.clone(),
        pod: e.pod_name.clone(),
        ready: e.ready,
    }
}

fn service(host: &str, svc: Option<&Service>, eps: &[Endpoint]) -> ServiceDump {
    // hostnames are `<name>.<namespace>.svc.<suffix>`.
    let mut parts = host.split('.');
    let (name, namespace) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    ServiceDump {
        hostname: host.to_string(),
        defined: svc.is_some(),
        namespace: svc
            .map(|s| s.key.namespace.clone())
            .unwrap_or_else(|| namespace.to_string()),
        name: svc.map(|s| s.key.name.clone()).unwrap_or_else(|| name.to_string()),
        ports: svc
            .map(|s| {
                s.ports
                    .iter()
                    .map(|p| PortDump {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: protocol_name(p.protocol),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        labels: svc.map(|s| s.labels.clone()).unwrap_or_default(),
        cluster_ips: svc
            .map(|s| {
                s.cluster_ips
                    .iter()
                    .map(|(c, ips)| (c.clone(), ips.iter().map(ToString::to_string).collect()))
                    .collect()
            })
            .unwrap_or_default(),
        endpoints: eps.iter().map(endpoint).collect(),
    }
}

/// The whole snapshot.
pub fn registryz(snap: &Snapshot) -> RegistryDump {
    let hosts: BTreeSet<&String> = snap.services.keys().chain(snap.endpoints.keys()).collect();
    let name = |ns: &str, n: &str| format!("{ns}/{n}");
    RegistryDump {
        version: snap.version,
        services: hosts
            .into_iter()
            .map(|h| service(h, snap.service(h).map(|s| s.as_ref()), snap.endpoints(h)))
            .collect(),
        config: ConfigDump {
            gateways: snap
                .config
                .gateways
                .iter()
                .map(|c| name(&c.meta.namespace, &c.meta.name))
                .collect(),
            virtual_services: snap
                .config
                .virtual_services
                .iter()
                .map(|c| name(&c.meta.namespace, &c.meta.name))
                .collect(),
            destination_rules: snap
                .config
                .destination_rules
                .iter()
                .map(|c| name(&c.meta.namespace, &c.meta.name))
                .collect(),
        },
    }
}

/// `/debug/networkz`: the networks' gateways, where each came from and what became of its
/// address, and the networks held back while a gateway hostname resolves.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkDump<'a> {
    pub version: u64,
    /// Some gateway exists: endpoints are filtered per network (split horizon).
    pub multi_network: bool,
    /// istiod's weight scale factor.
    pub lcm: u32,
    pub gateways: &'a [super::network::GatewayStatus],
    pub unresolved_networks: &'a BTreeSet<String>,
    /// The last refused mesh config update, until a good one arrives.
    pub mesh_config_error: Option<String>,
}

pub fn networkz(s: &Snapshot, mesh_config_error: Option<String>) -> NetworkDump<'_> {
    NetworkDump {
        version: s.version,
        multi_network: s.networks.is_multi_network(),
        lcm: s.networks.scale(),
        gateways: &s.networks.statuses,
        unresolved_networks: &s.networks.unresolved_networks,
        mesh_config_error,
    }
}
