//! Data: obtaining the corpus (`fetch`), reading a folder of `.txt` files (`corpus`),
//! and tokenized train/validation shards cached on disk with batch sampling (`shards`).

pub mod corpus;
pub mod fetch;
pub mod retrieval;
pub mod shards;
