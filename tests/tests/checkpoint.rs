//! Checkpoints: save/load round trips, damaged files (named cases and a generated corpus
//! under a memory cap), format versions, safe saves, and values at the edges.

#[path = "checkpoint/corpus.rs"]
mod corpus;
#[path = "checkpoint/corrupt.rs"]
mod corrupt;
#[path = "checkpoint/roundtrip.rs"]
mod roundtrip;
#[path = "checkpoint/save.rs"]
mod save;
#[path = "checkpoint/values.rs"]
mod values;
#[path = "checkpoint/versions.rs"]
mod versions;
