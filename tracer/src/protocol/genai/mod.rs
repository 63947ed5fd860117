//! Dify and model-API bodies: which routes matter, and the facts read from their bodies
//! (model, token usage, finish reasons, stream events, error codes) in fixed memory.

pub mod capture;
pub mod inspect;
pub mod json_pick;
pub mod route;
#[cfg(test)]
mod tests;

pub use inspect::{BodyFacts, BodyInspector, CodeError};
pub use route::{Route, route_of};
