//! GenAI and Dify semantics of spans (OTel GenAI conventions, `dify.*`), and the one
//! redaction module for everything captured from bodies.

pub mod http;
pub mod redact;
