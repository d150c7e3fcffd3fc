//! Control filesystem library.
