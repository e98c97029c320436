//! Interop with the original PyTorch FGN code: state-dict import.

#[path = "interop/import_fgn.rs"]
mod import_fgn;
