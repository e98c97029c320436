//! The layer and network through their public API: VarBuilder names, short training runs, classical → Gaussian conversion.

#[path = "layer/convert_linear.rs"]
mod convert_linear;
#[path = "layer/low_rank.rs"]
mod low_rank;
#[path = "layer/net_edges.rs"]
mod net_edges;
#[path = "layer/training_short_run.rs"]
mod training_short_run;
#[path = "layer/varbuilder.rs"]
mod varbuilder;
