//! Generated protobuf and gRPC types.

/// The Istio CA API (`istio.v1.auth`).
#[allow(clippy::all, missing_docs)]
pub mod istio_ca {
    tonic::include_proto!("istio.v1.auth");
}

/// Encoded `FileDescriptorSet` of everything compiled from `proto/` (with its imports), for
/// gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/meshd_descriptor.bin"));

/// Full gRPC service name of the CA, as registered with the health service.
pub const CA_SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";
