//! Copy engine.
