//! Criterion benchmarks live in `benches/`; this library only gives the package a target.
