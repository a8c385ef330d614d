//! The Dockerfile frontend (`dockerfile.v0`): Dockerfile → LLB as BuildKit v0.11.6's built-in
//! frontend does it.
#![forbid(unsafe_code)]

pub mod dockerfile;
pub mod instructions;
pub mod parser;
pub mod shell;
mod suggest;
