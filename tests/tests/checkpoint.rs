//! Checkpoints: save/load round trips and damaged files.

#[path = "checkpoint/corrupt.rs"]
mod corrupt;
#[path = "checkpoint/roundtrip.rs"]
mod roundtrip;
