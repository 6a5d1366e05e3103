//! xDS type URLs and their push order.

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// istio-agent's health probe, sent as a request and never answered.
pub const HEALTH_INFO: &str = "type.googleapis.com/istio.v1.HealthInformation";

/// istiod's push order: clusters before their endpoints, listeners before their routes.
pub const PUSH_ORDER: [&str; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];

/// Wildcard types: an empty name list means "everything" (CDS, LDS); for the others an empty
/// list means "nothing" (unsubscribe).
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == CLUSTER || type_url == LISTENER
}

/// Short name for metrics (`pilot_xds_pushes{type="cds"}`) and logs.
pub fn short(type_url: &str) -> &'static str {
    match type_url {
        CLUSTER => "cds",
        ENDPOINT => "eds",
        LISTENER => "lds",
        ROUTE => "rds",
        SECRET => "sds",
        _ => "other",
    }
}

pub fn is_known(type_url: &str) -> bool {
    PUSH_ORDER.contains(&type_url)
}
