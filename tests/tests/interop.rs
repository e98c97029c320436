//! Interop with the original PyTorch FGN code: state-dict import and classic → FGN conversion,
//! against synthetic state dicts and the original's own fixtures (`tests/data/interop/`).

#[path = "interop/fixtures.rs"]
mod fixtures;
#[path = "interop/import_fgn.rs"]
mod import_fgn;
