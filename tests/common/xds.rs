//! ADS clients for tests: a SotW stream over meshd's plaintext port, request builders.
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::TestMeshd;

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

pub async fn plaintext(t: &TestMeshd) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", t.m().addrs.plaintext))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub struct Sotw {
    pub tx: mpsc::Sender<DiscoveryRequest>,
    pub rx: tonic::Streaming<DiscoveryResponse>,
}

impl Sotw {
    pub async fn open(ch: Channel, token: Option<&str>) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let rx = AggregatedDiscoveryServiceClient::new(ch)
            .stream_aggregated_resources(req)
            .await?
            .into_inner();
        Ok(Self { tx, rx })
    }

    pub async fn send(&self, r: DiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }

    pub async fn recv(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(10), self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => panic!("stream ended"),
            Ok(Err(s)) => Err(s),
            Err(_) => panic!("no response within 10s"),
        }
    }
}

pub fn req(type_url: &str, names: &[&str], nonce: &str, node: Option<Node>) -> DiscoveryRequest {
    DiscoveryRequest {
        node,
        type_url: type_url.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// Every resource of a response, decoded.
pub fn decode_all<M: Message + Default>(r: &DiscoveryResponse) -> Vec<M> {
    r.resources
        .iter()
        .map(|a| M::decode(a.value.as_slice()).expect("decodes"))
        .collect()
}
