//! One module per `sparrow` subcommand: its arguments (clap) and its `run`.

pub mod bench;
pub mod chat;
pub mod convert;
pub mod corpus;
pub mod dsa;
pub mod eval;
pub mod experiment;
pub mod generate;
pub mod logits;
pub mod model;
pub mod params;
pub mod plot;
pub mod serve;
pub mod tokenizer;
pub mod train;
