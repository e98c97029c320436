//! Issue 17 ("Hardening II"): every input file is a regular file, outputs never replace a
//! FIFO, device or input, writes are atomic and clean their debris, values that overflow are
//! refused (never turned into NaN), raw precision values outside the finite range are
//! refused on every parameterization, configs are strict, singular factors are errors.

#[path = "hardening/files.rs"]
mod files;
#[path = "hardening/overflow.rs"]
mod overflow;
#[path = "hardening/precision_range.rs"]
mod precision_range;
