//! The losses crate against closed forms: errors, fits, λ-loss, mixtures, the FGN objective, reductions,
//! Rennie's gradients.

#[path = "losses/errors.rs"]
mod errors;
#[path = "losses/fit.rs"]
mod fit;
#[path = "losses/lambda.rs"]
mod lambda;
#[path = "losses/mixture.rs"]
mod mixture;
#[path = "losses/objective.rs"]
mod objective;
#[path = "losses/reductions.rs"]
mod reductions;
#[path = "losses/rennie.rs"]
mod rennie;
