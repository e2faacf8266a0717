//! gRPC over cleartext HTTP/2 (h2c, prior knowledge): one unary call at a time.

use super::export::ExportError;

pub struct GrpcClient {
    url: String,
}

impl GrpcClient {
    pub fn new(url: &str) -> GrpcClient {
        GrpcClient { url: url.to_string() }
    }

    pub fn unary(&mut self, path: &str, _message: &[u8]) -> Result<(), ExportError> {
        Err(ExportError::Transient(format!("{}{path}: gRPC not built yet", self.url)))
    }
}
